"""The filters about connections and the node's lifetime: limit, exitlast, exitwhen, noparallel
and multi-conn, in real node processes driven by real clients (libnbd, nbdinfo), each checked
side by side with nbdkit 1.32's filter of the same name given the same params: who is
refused and how, when the server exits, how long serialized requests take, what is
advertised (nbdinfo --json), and which flushes reach the layer below (a log node under ours,
nbdkit's log filter under nbdkit's). Where we differ on purpose the test says so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, Proc, alive, capabilities, nbd_connect, run, wait_for
from test_filters_policy import Control

from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb
from nodes.filters.exitwhen import ExitwhenParams
from nodes.filters.multi_conn import MultiConnParams
from nodes.filters.noparallel import NoparallelParams
from nodes.params import ParamError, parse_params

StartNode = Callable[..., Proc]
StartNbdkit = Callable[..., Proc]


def connect_error(uri: str) -> str | None:
    """How a libnbd connection to `uri` fails: its errno name ("" if it has none); None if
    it connects. (A connection closed before the greeting gives "" or EINVAL, by timing:
    `greeted` tells that case.)"""
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error as exc:
        return str(exc.errno or "")
    h.shutdown()
    return None


def greeted(path: str) -> bool:
    """Whether a client connecting to unix socket `path` is greeted (NBDMAGIC), or refused:
    closed before the greeting, without a word (what a preconnect refusal looks like)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            return s.recv(8) == b"NBDMAGIC"
        except ConnectionResetError:
            return False


def exits_within(p: Proc, seconds: float) -> int | None:
    """The exit status of `p` if it exits within `seconds`; None if it is still running."""
    try:
        return p.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def both_exit_within(procs: list[Proc], seconds: float) -> list[int | None]:
    deadline = time.monotonic() + seconds
    return [exits_within(p, max(0.0, deadline - time.monotonic())) for p in procs]


# limit ---------------------------------------------------------------------------------------


def limit_pair(start_node: StartNode, start_nbdkit: StartNbdkit, *params: str) -> list[Proc]:
    mem = start_node("memory", "1M")
    ours = start_node("limit", *params, upstreams=[mem.uri])
    return [ours, start_nbdkit("--filter=limit", "memory", "1M", *params)]


@pytest.mark.parametrize("limit", [1, 2])
def test_limit_refuses_clients_over_the_limit_as_nbdkit(
    start_node: StartNode, start_nbdkit: StartNbdkit, limit: int
) -> None:
    for server in limit_pair(start_node, start_nbdkit, f"limit={limit}"):
        held = [nbd_connect(server.uri) for _ in range(limit)]
        # Closed before the greeting, without a word, by both.
        assert not greeted(server.socket), server.uri
        assert run(["nbdinfo", server.uri], check=False).returncode != 0
        assert held[0].pread(512, 0) == bytes(512)  # those connected are served on
        held.pop().shutdown()
        wait_for(lambda s=server: connect_error(s.uri) is None, 5, "a slot to come free")
        for h in held:
            h.shutdown()


def test_limit_zero_means_no_limit(start_node: StartNode, start_nbdkit: StartNbdkit) -> None:
    for server in limit_pair(start_node, start_nbdkit, "limit=0"):
        held = [nbd_connect(server.uri) for _ in range(4)]
        assert connect_error(server.uri) is None
        for h in held:
            h.shutdown()


def test_limit_default_is_one_client(start_node: StartNode, start_nbdkit: StartNbdkit) -> None:
    for server in limit_pair(start_node, start_nbdkit):
        h = nbd_connect(server.uri)
        assert not greeted(server.socket)
        h.shutdown()


def test_limit_refuses_the_export_to_a_client_that_negotiated_while_it_filled(
    start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    """A client let in when a slot was free, which asks for the export after another took
    the slot, is refused NBD_OPT_GO (NBD_REP_ERR_UNKNOWN: ENOENT) and may try again later."""
    for server in limit_pair(start_node, start_nbdkit, "limit=1"):
        slow = nbd.NBD()
        slow.set_opt_mode(True)
        slow.connect_uri(server.uri)  # greeted: past preconnect, in option negotiation
        fast = nbd_connect(server.uri)
        with pytest.raises(nbd.Error) as refused:
            slow.opt_go()
        assert refused.value.errno == "ENOENT", server.uri
        fast.shutdown()
        # The refusal answered the option, not the connection: the client may ask again, and
        # is let in once the server has seen the other go.
        wait_for(functools.partial(went, slow), 5, "the slot to come free")
        assert slow.pread(1, 0) == b"\0"
        slow.shutdown()


def went(h: Any) -> bool:
    """NBD_OPT_GO on an option-mode handle: True if the server let the client in."""
    try:
        h.opt_go()
    except nbd.Error:
        return False
    return True


def test_limit_is_live(start_node: StartNode) -> None:
    mem = start_node("memory", "1M")
    node = start_node("limit", "limit=1", upstreams=[mem.uri], control=True)
    h = nbd_connect(node.uri)
    assert not greeted(node.socket)
    subprocess.run([*NBDFABRIC, "ctl", str(node.control), "set", "limit=2"], cwd=ROOT,
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    h2 = nbd_connect(node.uri)  # the new limit applies to the next client
    assert not greeted(node.socket)
    h.shutdown()
    h2.shutdown()


# exitlast ------------------------------------------------------------------------------------


def exitlast_pair(start_node: StartNode, start_nbdkit: StartNbdkit) -> list[Proc]:
    mem = start_node("memory", "1M")
    ours = start_node("exitlast", upstreams=[mem.uri])
    return [ours, start_nbdkit("--filter=exitlast", "memory", "1M")]


def test_exitlast_exits_when_the_last_client_leaves_as_nbdkit(
    start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    servers = exitlast_pair(start_node, start_nbdkit)
    time.sleep(0.5)
    assert all(alive(s.pid) for s in servers), "exited before any client came"
    first = [nbd_connect(s.uri) for s in servers]
    second = [nbd_connect(s.uri) for s in servers]
    for h in first:
        h.shutdown()
    assert both_exit_within(servers, 0.5) == [None, None], "exited with a client connected"
    for h in second:
        h.pread(512, 0)
        h.shutdown()
    assert both_exit_within(servers, 5) == [0, 0]


def test_exitlast_does_not_count_a_client_that_never_finished_negotiating(
    start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    servers = exitlast_pair(start_node, start_nbdkit)
    for server in servers:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(server.socket)
            s.recv(18)  # the greeting; then gone
    assert both_exit_within(servers, 1) == [None, None]
    for server in servers:
        run(["nbdinfo", server.uri])
    assert both_exit_within(servers, 5) == [0, 0]


# exitwhen ------------------------------------------------------------------------------------


def test_exitwhen_params_read_nbdkit_spellings() -> None:
    p = parse_params(
        "exitwhen", ExitwhenParams,
        ["exit-when-pipe-closed=3", "exit-when-fd-closed=0x4", "exit-when-pid-exits=1",
         "exit-when-process-exits=2", "exit-when-process-exits=3", "exit-when-poll=5"],
    )  # fmt: skip
    assert isinstance(p, ExitwhenParams)
    assert p.exit_when_pipe_closed == ["3", "0x4"]
    assert p.exit_when_process_exits == ["2", "3", "1"]
    assert p.exit_when_poll == 5.0
    for bad in ["exit-when-poll=0", "exit-when-pipe-closed=-1", "exit-when-process-exits=x"]:
        with pytest.raises(ParamError, match=bad.split("=")[0]):
            parse_params("exitwhen", ExitwhenParams, [bad])


def test_exitwhen_exits_at_once_if_the_event_happened_before_it_started(
    tmp_path: Path, start_node: StartNode
) -> None:
    stop = tmp_path / "stop"
    stop.touch()
    word = f"exit-when-file-created={stop}"
    ours = subprocess.run(
        [*NBDFABRIC, "node", "exitwhen", word, "--upstream", "nbd+unix:///?socket=/nonexistent",
         "--upstream-timeout", "2", "--listen", f"unix:{tmp_path}/ours.sock", "--print-uri"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    # Status 0, no URI printed, nothing listening, and the upstream never asked for.
    assert (ours.returncode, ours.stdout) == (0, ""), ours.stderr
    assert not (tmp_path / "ours.sock").exists()
    theirs = subprocess.run(
        ["nbdkit", "-f", "-U", f"{tmp_path}/theirs.sock", "--filter=exitwhen", "memory", "1M",
         word], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert theirs.returncode == 0, theirs.stderr


def test_exitwhen_script_under_control_logs_nothing_about_fork(
    tmp_path: Path, start_node: StartNode
) -> None:
    """exit-when-script in a node with --control: the scripts (one per poll) start without
    fork(), so gRPC logs no `skipping fork() handlers` line for each (nodes/spawn.py)."""
    runs, flag = tmp_path / "runs", tmp_path / "flag"
    mem = start_node("memory", "1M")
    node = start_node("exitwhen", f"exit-when-script=echo >> {runs}; test -e {flag} && exit 88",
                      "exit-when-poll=50ms", upstreams=[mem.uri], control=True)  # fmt: skip
    wait_for(lambda: runs.exists() and len(runs.read_text()) >= 5, 30, "five polls")
    flag.touch()
    assert node.proc.wait(30) == 0
    assert "fork" not in node.stderr() and "gRPC" not in node.stderr(), node.stderr()


class Trigger:
    """One exitwhen event, its params, and how the test makes it happen."""

    def __init__(self, tmp_path: Path, kind: str) -> None:
        self.kind = kind
        self.pass_fds: tuple[int, ...] = ()
        self._undo: Callable[[], None] = lambda: None
        flag = tmp_path / "flag"
        if kind == "file-created":
            self.words = [f"exit-when-file-created={flag}"]
            self.fire = flag.touch
        elif kind == "file-deleted":
            flag.touch()
            self.words = [f"exit-when-file-deleted={flag}"]
            self.fire = flag.unlink
        elif kind == "script":
            self.words = [f"exit-when-script=test -e {flag} && exit 88; exit 0"]
            self.fire = flag.touch
        elif kind == "process-exits":
            child = subprocess.Popen(["sleep", "60"])
            self.words = [f"exit-when-process-exits={child.pid}"]
            self.fire = lambda: (child.kill(), child.wait())  # reaped: /proc/PID is gone
            self._undo = self.fire
        else:
            read_end, write_end = os.pipe()
            self.words = [f"exit-when-pipe-closed={read_end}"]
            self.pass_fds = (read_end,)
            self.fire = lambda: os.close(write_end)
            self._undo = lambda: close_fds(read_end, write_end)

    def close(self) -> None:
        self._undo()


def close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


EVENTS = ["file-created", "file-deleted", "script", "process-exits", "pipe-closed"]


@pytest.fixture
def exitwhen_pair(tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit) -> Any:
    made: list[Trigger] = []

    def make(kind: str, *more: str) -> tuple[Trigger, list[Proc]]:
        trigger = Trigger(tmp_path, kind)
        made.append(trigger)
        words = [*trigger.words, *more]
        mem = start_node("memory", "1M")
        ours = start_node("exitwhen", *words, upstreams=[mem.uri], pass_fds=trigger.pass_fds)
        theirs = start_nbdkit("--filter=exitwhen", "memory", "1M", *words,
                              pass_fds=trigger.pass_fds)  # fmt: skip
        return trigger, [ours, theirs]

    yield make
    for trigger in made:
        trigger.close()


@pytest.mark.parametrize("event", EVENTS)
def test_exitwhen_an_idle_server_exits_within_a_poll_of_the_event_as_nbdkit(
    exitwhen_pair: Any, event: str
) -> None:
    trigger, servers = exitwhen_pair(event, "exit-when-poll=1")
    assert both_exit_within(servers, 1.3) == [None, None], "exited before the event"
    fired = time.monotonic()
    trigger.fire()
    assert both_exit_within(servers, 4) == [0, 0]
    assert time.monotonic() - fired < 3


def test_exitwhen_refuses_new_clients_and_exits_when_the_last_leaves_as_nbdkit(
    exitwhen_pair: Any,
) -> None:
    """The poll is 60s: the exit comes from the last client's disconnection, the refusal
    from the check each new client gets."""
    trigger, servers = exitwhen_pair("file-created")
    held = [nbd_connect(s.uri) for s in servers]
    trigger.fire()
    for server, h in zip(servers, held, strict=True):
        assert not greeted(server.socket), server.uri  # noticed by the newcomer's check
        h.pwrite(b"x" * 512, 0)  # the client connected before is served on
        assert h.pread(512, 0) == b"x" * 512
    assert both_exit_within(servers, 0.5) == [None, None], "exited with a client connected"
    for h in held:
        h.shutdown()
    assert both_exit_within(servers, 5) == [0, 0]


def test_exitwhen_notices_an_event_when_a_client_leaves_as_nbdkit(exitwhen_pair: Any) -> None:
    """Nobody connects after the event: the last client's disconnection checks, and exits."""
    trigger, servers = exitwhen_pair("script")
    held = [nbd_connect(s.uri) for s in servers]
    trigger.fire()
    for h in held:
        h.shutdown()
    assert both_exit_within(servers, 5) == [0, 0]


def test_exitwhen_refuses_a_bad_fd_or_pid_at_start(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    upstream = "nbd+unix:///?socket=/nonexistent"
    for word, why in [
        ("exit-when-pipe-closed=999", "exit-when-pipe-closed=999"),
        (f"exit-when-process-exits={gone.pid}", f"/proc/{gone.pid}/stat"),
    ]:
        ours = subprocess.run(
            [*NBDFABRIC, "node", "exitwhen", word, "--upstream", upstream, "--listen",
             f"unix:{tmp_path}/n.sock"], cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert ours.returncode == 1 and why in ours.stderr, ours.stderr
        theirs = subprocess.run(
            ["nbdkit", "-f", "-U", f"{tmp_path}/k.sock", "--filter=exitwhen", "memory", "1M",
             word], capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        # nbdkit refuses the pid alike, but takes a bad fd for "the pipe is closed": exit 0.
        assert theirs.returncode == (0 if "pipe" in word else 1), theirs.stderr


# noparallel ----------------------------------------------------------------------------------

DELAY_MS = 150  #: each read waits upstream this long
DELAY = DELAY_MS / 1000


def noparallel_pair(start_node: StartNode, start_nbdkit: StartNbdkit, *params: str) -> list[Proc]:
    """Ours over a delay node, nbdkit over its delay filter: every read takes DELAY."""
    mem = start_node("memory", "1M")
    slow = start_node("delay", f"delay-read={DELAY_MS}ms", upstreams=[mem.uri])
    theirs = start_nbdkit(
        "--filter=noparallel", "--filter=delay", "memory", "1M", f"rdelay={DELAY_MS}ms", *params
    )
    return [start_node("noparallel", *params, upstreams=[slow.uri]), theirs]


def timed_reads(uri: str, connections: int, reads: int) -> float:
    """Seconds for `reads` reads sent at once on each of `connections` connections."""
    handles = [nbd_connect(uri) for _ in range(connections)]
    start = time.monotonic()
    cookies = [(h, h.aio_pread(nbd.Buffer(512), 4096 * i)) for h in handles for i in range(reads)]
    for h, cookie in cookies:
        while not h.aio_command_completed(cookie):
            h.poll(-1)
    elapsed = time.monotonic() - start
    for h in handles:
        h.shutdown()
    return elapsed


@pytest.mark.parametrize(
    ("serialize", "connections", "reads", "turns"),
    [
        ("requests", 1, 4, 4),  # one client: its four reads in turn
        ("requests", 2, 2, 2),  # two clients side by side, each its two in turn
        ("all-requests", 2, 2, 4),  # every read of the node in turn
    ],
)
def test_noparallel_runs_requests_in_turn_as_nbdkit(
    start_node: StartNode,
    start_nbdkit: StartNbdkit,
    serialize: str,
    connections: int,
    reads: int,
    turns: int,
) -> None:
    for server in noparallel_pair(start_node, start_nbdkit, f"serialize={serialize}"):
        elapsed = timed_reads(server.uri, connections, reads)
        assert turns * DELAY * 0.95 <= elapsed < (turns + 1.5) * DELAY, (server.uri, elapsed)


def test_noparallel_without_it_the_reads_overlap(start_node: StartNode) -> None:
    """The baseline the timings above are measured against: the delay node alone serves
    the four reads of one client together."""
    mem = start_node("memory", "1M")
    slow = start_node("delay", f"delay-read={DELAY_MS}ms", upstreams=[mem.uri])
    assert timed_reads(slow.uri, 1, 4) < 2.5 * DELAY


def connect_in_background(uri: str) -> list[Any]:
    """A list that gets the libnbd handle once a connection to `uri` is made (in a thread)."""
    got: list[Any] = []
    threading.Thread(target=lambda: got.append(nbd_connect(uri)), daemon=True).start()
    return got


def test_noparallel_connections_mode_serves_one_client_at_a_time_as_nbdkit(
    start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    for server in noparallel_pair(start_node, start_nbdkit, "serialize=connections"):
        assert capabilities(server.uri, ["can_multi_conn"]) == {"can_multi_conn": False}
        first = nbd_connect(server.uri)
        got = connect_in_background(server.uri)
        time.sleep(0.6)
        assert not got, "a second client was served while the first was connected"
        first.shutdown()
        wait_for(lambda g=got: g, 5, "the second client to be served after the first left")
        assert got[0].pread(1, 0) == b"\0"
        got[0].shutdown()


def test_noparallel_connections_mode_frees_the_turn_of_a_client_that_never_negotiated(
    start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    for server in noparallel_pair(start_node, start_nbdkit, "serialize=connections"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(server.socket)
            assert s.recv(18)  # greeted: this client has the turn; it leaves without a word
        got = connect_in_background(server.uri)
        wait_for(lambda g=got: g, 5, "the next client (still waiting for the turn of one gone?)")
        got[0].shutdown()


@pytest.mark.parametrize("serialize", ["requests", "all-requests"])
def test_noparallel_keeps_multi_conn_unless_serializing_connections(
    start_node: StartNode, start_nbdkit: StartNbdkit, serialize: str
) -> None:
    for server in noparallel_pair(start_node, start_nbdkit, f"serialize={serialize}"):
        assert capabilities(server.uri, ["can_multi_conn"]) == {"can_multi_conn": True}


def test_noparallel_params_read_nbdkit_spellings() -> None:
    spellings = [
        (["serialise=connections"], "connections"),
        (["serialize=all_requests"], "all-requests"),
        ([], "requests"),
    ]
    for words, mode in spellings:
        p = parse_params("noparallel", NoparallelParams, words)
        assert isinstance(p, NoparallelParams) and p.serialize == mode


# multi-conn ----------------------------------------------------------------------------------

MODES = ["auto", "emulate", "plugin", "unsafe", "disable"]
#: What multi-conn changes, and what a client needs to know about flushing.
MC_KEYS = ["can_multi_conn", "can_fua", "can_flush", "is_read_only"]


class McPair:
    """Our multi-conn node and nbdkit's filter with the same params, each over a memory disk
    that advertises multi-conn (`plain`) or one that does not (behind a multi-conn node or
    filter with multi-conn-mode=disable), and a log below each that shows the flushes."""

    def __init__(
        self, tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit, plain: bool,
        *params: str,
    ) -> None:  # fmt: skip
        n = len(list(tmp_path.glob("ours*.jsonl")))
        self.ours_log, self.theirs_log = tmp_path / f"ours{n}.jsonl", tmp_path / f"theirs{n}.log"
        mem = start_node("memory", "1M")
        disk = mem if plain else start_node("multi-conn", "multi-conn-mode=disable",
                                            upstreams=[mem.uri])  # fmt: skip
        logged = start_node("log", f"logfile={self.ours_log}", upstreams=[disk.uri])
        self.ours = start_node("multi-conn", *params, upstreams=[logged.uri], control=True)
        log = f"logfile={self.theirs_log}"
        filters = ["--filter=multi-conn", "--filter=log"]
        if plain:
            self.theirs = start_nbdkit(*filters, "memory", "1M", log, *params)
        else:
            inner = start_nbdkit("--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable")
            self.theirs = start_nbdkit(*filters, "nbd", f"socket={inner.socket}", log, *params)

    def flushes(self) -> tuple[int, int]:
        """Flushes that reached the layer below: (ours, nbdkit's)."""
        lines = self.ours_log.read_text().splitlines()
        ours = sum(json.loads(line).get("op") == "flush" for line in lines)
        theirs = len(re.findall(r"connection=\d+ Flush id=", self.theirs_log.read_text()))
        return ours, theirs


@pytest.mark.parametrize("mode", MODES)
def test_multi_conn_advertises_as_nbdkit(
    tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit, mode: str
) -> None:
    for plain in (True, False):
        pair = McPair(tmp_path, start_node, start_nbdkit, plain, f"multi-conn-mode={mode}")
        ours, theirs = capabilities(pair.ours.uri, MC_KEYS), capabilities(pair.theirs.uri, MC_KEYS)
        assert ours == theirs, (mode, plain)
        if mode == "plugin":
            assert ours["can_multi_conn"] is plain  # the upstream's: the test can tell
        else:
            assert ours["can_multi_conn"] is (mode != "disable")


def test_multi_conn_emulate_needs_an_upstream_that_can_flush(
    start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    """pattern cannot flush: every client is refused the export (ENOENT), as by nbdkit."""
    pat = start_node("pattern", "1M")
    servers = [
        start_node("multi-conn", "multi-conn-mode=emulate", upstreams=[pat.uri]),
        start_nbdkit("--filter=multi-conn", "pattern", "1M", "multi-conn-mode=emulate"),
    ]
    for server in servers:
        assert connect_error(server.uri) == "ENOENT", server.uri
    auto = start_node("multi-conn", upstreams=[pat.uri])  # pattern advertises multi-conn: plugin
    assert connect_error(auto.uri) is None


#: (connection, operation) in turn, on three connections.
STEPS = [
    ("A", "flush"),  # nothing written: skipped, unless track-dirty=off
    ("A", "write"),
    ("B", "flush"),  # B's flush covers A's write
    ("A", "flush"),
    ("B", "read"),
    ("A", "flush"),
    ("B", "write-fua"),  # in emulate: a write and the flush of every connection
    ("A", "flush"),
    ("A", "write"),
    ("B", "zero"),
    ("A", "flush"),  # emulate: nbdkit flushes A's and B's plugin connection, we the upstream
    ("B", "trim"),
    ("B", "read"),
    ("A", "flush"),
    ("B", "flush"),
    ("C", "write"),
    ("B", "read"),
    ("C", "leave"),  # dirty, and gone without a flush
    ("A", "flush"),  # emulate: only B (which read since) is left to need it
]
#: The step after which nbdkit flushes more than one connection in emulate mode.
BOTH_DIRTY = 10


def run_step(h: Any, op: str) -> None:
    if op == "flush":
        h.flush()
    elif op == "read":
        h.pread(512, 0)
    elif op == "write":
        h.pwrite(b"w" * 512, 0)
    elif op == "write-fua":
        h.pwrite(b"f" * 512, 512, nbd.CMD_FLAG_FUA)
    elif op == "zero":
        h.zero(4096, 4096)
    elif op == "trim":
        h.trim(4096, 8192)
    else:
        h.shutdown()


@pytest.mark.parametrize(
    ("plain", "mode", "track"),
    [
        *[(True, m, t) for m in ("emulate", "plugin", "disable") for t in ("conn", "fast", "off")],
        (False, "plugin", "connection"),  # flushes clean only the flushing connection
        (False, "plugin", "fast"),
        (False, "auto", "connection"),  # emulate
    ],
)
def test_multi_conn_passes_on_the_flushes_nbdkit_passes_on(
    tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit,
    plain: bool, mode: str, track: str,
) -> None:  # fmt: skip
    params = (f"multi-conn-mode={mode}", f"multi-conn-track-dirty={track}")
    pair = McPair(tmp_path, start_node, start_nbdkit, plain, *params)
    ours_control = Control(pair.ours)
    emulated = mode == "emulate" or (mode == "auto" and not plain)
    sides = [{name: nbd_connect(s.uri) for name in "ABC"} for s in (pair.ours, pair.theirs)]
    before = pair.flushes()
    got: list[tuple[int, int]] = []
    for who, op in STEPS:
        for handles in sides:
            run_step(handles[who], op)
        if op == "leave":  # the next step comes once both servers have seen it go
            wait_for(lambda: ours_control.status()["multi_conn"]["connections"] == 2, 5)
            wait_for(lambda: "Disconnect" in pair.theirs_log.read_text(), 5)
        now = pair.flushes()
        got.append((now[0] - before[0], now[1] - before[1]))
        before = now
    ours = [o for o, _ in got]
    theirs = [t for _, t in got]
    # Emulated, nbdkit flushes each connection that needs it; we flush the shared upstream once.
    assert ours == ([min(t, 1) for t in theirs] if emulated else theirs), got
    assert (theirs[0] > 0) == (track == "off"), "nbdkit skips a flush with nothing written"
    assert theirs[-1] >= 1, "a flush after a writer left without one"
    if emulated:
        assert theirs[BOTH_DIRTY] >= 2, "nbdkit flushes both connections' plugin connection"
    for handles in sides:
        for name in "AB":
            handles[name].shutdown()
    ours_control.channel.close()


def test_multi_conn_flush_on_one_connection_is_seen_by_another(
    start_node: StartNode,
) -> None:
    """What multi-conn promises, through nbdcopy's kind of use: a write on A, a flush on B,
    a read on C sees it (over an upstream without multi-conn, emulated)."""
    mem = start_node("memory", "1M")
    disk = start_node("multi-conn", "multi-conn-mode=disable", upstreams=[mem.uri])
    node = start_node("multi-conn", upstreams=[disk.uri])
    assert capabilities(node.uri, ["can_multi_conn"]) == {"can_multi_conn": True}
    a, b, c = (nbd_connect(node.uri) for _ in range(3))
    a.pwrite(b"A" * 4096, 0)
    b.flush()
    assert c.pread(4096, 0) == b"A" * 4096
    for h in (a, b, c):
        h.shutdown()


@pytest.mark.parametrize(
    ("mode", "track"), [(m, t) for m in ("emulate", "plugin") for t in ("conn", "fast")]
)
def test_multi_conn_a_flush_covers_the_writes_of_clients_that_have_gone(
    tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit, mode: str, track: str
) -> None:
    """NBD_CMD_FLUSH covers every write already replied to, also those of a client that left
    without flushing: the next flush, whoever sends it, goes upstream (found by the fuzz run's
    multi-conn shapes, over a writeback cache). Where we differ on purpose: nbdkit forgets a
    client's writes with its connection, so after the last client left it skips that flush,
    and (emulated, tracking connections) also while clients stay that neither wrote nor read
    since the last one."""
    params = (f"multi-conn-mode={mode}", f"multi-conn-track-dirty={track}")
    pair = McPair(tmp_path, start_node, start_nbdkit, True, *params)
    ours_control = Control(pair.ours)
    servers, left = (pair.ours, pair.theirs), 0

    def leave(handles: list[Any], staying: int) -> None:  # seen by both servers
        nonlocal left
        for h in handles:
            h.shutdown()
        left += 1
        wait_for(lambda: pair.theirs_log.read_text().count("Disconnect") == left, 5)
        wait_for(lambda: ours_control.status()["multi_conn"]["connections"] == staying, 5)

    got = []
    for stay in (False, True):
        stayers = [nbd_connect(s.uri) for s in servers] if stay else []
        writers = [nbd_connect(s.uri) for s in servers]
        for h in writers:
            h.pwrite(b"w" * 512, 0)
        leave(writers, staying=int(stay))  # without a flush
        flushers = stayers or [nbd_connect(s.uri) for s in servers]
        before = pair.flushes()
        for h in flushers:
            h.flush()
        now = pair.flushes()
        got.append((now[0] - before[0], now[1] - before[1]))
        leave(flushers, staying=0)
    # nbdkit, a client staying: the group's dirty bit stays, which all but emulate with
    # connections tracked go by.
    assert got == [(1, 0), (1, 0 if (mode, track) == ("emulate", "conn") else 1)], got
    ours_control.channel.close()


def delayed_multi_conn(start_node: StartNode, tmp_path: Path, mode: str, track: str,
                       delay: str) -> tuple[Proc, Proc, Path]:  # fmt: skip
    """A multi-conn node over a log (the flushes that reach below) over a delay node."""
    mem = start_node("memory", "1M")
    slow = start_node("delay", delay, upstreams=[mem.uri], control=True)
    log = tmp_path / f"below-{mode}-{track}.jsonl"
    logged = start_node("log", f"logfile={log}", upstreams=[slow.uri])
    params = (f"multi-conn-mode={mode}", f"multi-conn-track-dirty={track}")
    return start_node("multi-conn", *params, upstreams=[logged.uri]), slow, log


def flushes_in(log: Path) -> int:
    return sum(json.loads(line).get("op") == "flush" for line in log.read_text().splitlines())


def in_flight(node: Proc) -> int:
    control = Control(node)
    try:
        return int(control.stub.GetStats(pb.GetStatsRequest(), timeout=10).in_flight)
    finally:
        control.channel.close()


MODES_TRACKED = [("emulate", "conn"), ("plugin", "conn"), ("plugin", "fast")]


@pytest.mark.parametrize(("mode", "track"), MODES_TRACKED)
def test_multi_conn_a_write_done_while_a_flush_runs_is_left_for_the_next_flush(
    start_node: StartNode, tmp_path: Path, mode: str, track: str
) -> None:
    """A flush need not cover a write sent while it runs, but the next flush must: the flush
    marks clean what it covers before it goes upstream, not after (nbdkit clears after, and so
    also the mark of that write: its next flush is skipped)."""
    node, slow, log = delayed_multi_conn(start_node, tmp_path, mode, track, "delay-flush=1s")
    h = nbd_connect(node.uri)
    h.pwrite(b"a" * 512, 0)
    flush = h.aio_flush()
    wait_for(lambda: in_flight(slow) == 1, 10, "the flush to be under way below")
    h.pwrite(b"b" * 512, 512)
    assert not h.aio_command_completed(flush), "the write was done after the flush, not during"
    while not h.aio_command_completed(flush):
        h.poll(1000)
    before = flushes_in(log)
    h.flush()
    assert flushes_in(log) == before + 1, "the flush after the write was skipped"
    h.shutdown()


@pytest.mark.parametrize(("mode", "track"), MODES_TRACKED)
def test_multi_conn_a_write_under_way_when_a_flush_runs_is_left_for_the_next_flush(
    start_node: StartNode, tmp_path: Path, mode: str, track: str
) -> None:
    """A write marks its connection dirty once it is done, not when it starts (as nbdkit
    does): a flush from another client while it is under way covers it not, and must not
    clear its mark."""
    node, slow, log = delayed_multi_conn(start_node, tmp_path, mode, track, "delay-write=1s")
    writer, flusher = nbd_connect(node.uri), nbd_connect(node.uri)
    write = writer.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"w" * 512)), 0)
    wait_for(lambda: in_flight(slow) == 1, 10, "the write to be under way below")
    flusher.flush()
    assert not writer.aio_command_completed(write), "the flush came after the write, not during"
    while not writer.aio_command_completed(write):
        writer.poll(1000)
    before = flushes_in(log)
    flusher.flush()
    assert flushes_in(log) == before + 1, "the flush after the write was skipped"
    for h in (writer, flusher):
        h.shutdown()


@pytest.mark.parametrize(("mode", "track"), MODES_TRACKED)
def test_multi_conn_a_flush_that_failed_is_owed_again(
    start_node: StartNode, tmp_path: Path, mode: str, track: str
) -> None:
    """What a flush marked clean before it went upstream is dirty again if it failed: the
    client's retry goes upstream."""
    failing = tmp_path / "failing"
    mem = start_node("memory", "1M")
    error = start_node("error", "error-flush-rate=100%", f"error-flush-file={failing}",
                       upstreams=[mem.uri])  # fmt: skip
    log = tmp_path / "below.jsonl"
    logged = start_node("log", f"logfile={log}", upstreams=[error.uri])
    params = (f"multi-conn-mode={mode}", f"multi-conn-track-dirty={track}")
    h = nbd_connect(start_node("multi-conn", *params, upstreams=[logged.uri]).uri)
    h.pwrite(b"w" * 512, 0)
    failing.touch()
    with pytest.raises(nbd.Error):
        h.flush()
    failing.unlink()
    before = flushes_in(log)
    h.flush()
    assert flushes_in(log) == before + 1, "the retry was skipped"
    h.shutdown()


def test_multi_conn_params_read_nbdkit_spellings() -> None:
    p = parse_params("multi-conn", MultiConnParams,
                     ["multi-conn-track-dirty=conn", "multi-conn-export-name=true"])  # fmt: skip
    assert isinstance(p, MultiConnParams)
    assert (p.multi_conn_mode, p.multi_conn_track_dirty, p.multi_conn_exportname) == (
        "auto", "connection", True)  # fmt: skip
    with pytest.raises(ParamError, match="multi-conn-mode"):
        parse_params("multi-conn", MultiConnParams, ["multi-conn-mode=sometimes"])
