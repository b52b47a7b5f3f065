"""`nbdfabric chain`: nbdkit command lines (`-U - --filter=A --filter=B plugin ARGS --run CMD`)
served as a chain of node processes, checked against nbdkit 1.32 running the same line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import NBDFABRIC, ROOT, alive, read_all, run, wait_for

MiB = 1 << 20


def chain(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*NBDFABRIC, "chain", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    if check and res.returncode != 0:
        raise AssertionError(f"chain {args} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


#: Prints the export's capabilities and the sha256 of its content.
PROBE = 'nbdinfo --json "$uri" && nbdcopy "$uri" - | sha256sum'


def probe(output: str) -> tuple[dict[str, Any], str]:
    text, _, digest = output.rpartition("}")
    info = json.loads(text + "}")["exports"][0]
    keys = ("export-size", "is_read_only", "can_flush", "can_trim", "can_zero", "can_cache",
            "can_fua", "can_multi_conn", "contexts")  # fmt: skip
    return {k: info.get(k) for k in keys}, digest.split()[0]


def test_chain_runs_an_nbdkit_command_line_as_nbdkit_does() -> None:
    """The same words after `nbdkit` and after `nbdfabric chain`: the same disk (offset and
    range go to the offset filter, the magic size to the plugin), the same capabilities."""
    line = ("-U", "-", "--filter=delay", "--filter=offset", "pattern", "offset=4096", "1M",
            "range=65536", "rdelay=1ms", "--run", PROBE)  # fmt: skip
    ours = probe(chain(*line).stdout)
    theirs = probe(run(["nbdkit", *line]).stdout)
    assert ours == theirs
    assert ours[0]["export-size"] == 65536


def test_chain_order_is_nbdkits_first_filter_outermost(tmp_path: Path) -> None:
    """--filter=cow --filter=log: the cow is outermost and keeps the write, so the log under it
    never sees one; --filter=log --filter=cow: the log is outermost and sees it. The write and
    read back go through qemu-io in --run."""
    io = 'qemu-io -f raw "$uri" -c "write -P 0x5a 0 64k" -c "read -P 0x5a 0 64k"'
    for order, logged in ((("cow", "log"), False), (("log", "cow"), True)):
        logfile = tmp_path / f"{order[0]}.jsonl"
        chain("-U", "-", *(f"--filter={f}" for f in order), "memory", "1M",
              f"logfile={logfile}", "cow-block-size=4K", "--run", io)  # fmt: skip
        ops = [json.loads(line).get("op") for line in logfile.read_text().splitlines()]
        assert ("write" in ops) is logged, (order, ops)


def test_nofilter_serves_what_nbdkits_nofilter_serves() -> None:
    """--filter=nofilter over a sparse data disk: the same map, capabilities and bytes as nbdkit
    running the same line (the whole chain passes extents through, holes and all)."""
    line = ("-U", "-", "--filter=nofilter", "data", "@32768 1 2 3 @1048576 4", "size=2M",
            "--run", f'nbdinfo --map "$uri" && {PROBE}')  # fmt: skip
    ours, theirs = chain(*line).stdout, run(["nbdkit", *line]).stdout
    mapped, _, rest = ours.partition("{")
    their_map, _, their_rest = theirs.partition("{")
    assert probe("{" + rest) == probe("{" + their_rest)
    assert mapped == their_map
    assert "hole,zero" in mapped and "data" in mapped


def test_chain_serves_one_client_on_stdin_stdout_for_libnbd() -> None:
    """`nbdkit -s` as libnbd's connect_command runs it: the outermost node serves the pipe,
    the inner ones keep off it, and all are gone when the client hangs up."""
    import nbd

    h = nbd.NBD()
    h.connect_command([*NBDFABRIC, "chain", "-s", "--filter=cow", "--filter=delay", "memory",
                       "1M", "rdelay=1ms"])  # fmt: skip
    h.pwrite(b"x" * 4096, 0)
    assert (h.get_size(), bytes(h.pread(4096, 0))) == (MiB, b"x" * 4096)
    h.shutdown()


def test_chain_listens_where_nbdkits_p_and_i_say() -> None:
    """-p PORT and -i IP as nbdkit's (on 127.0.0.1 when no -i: nbdkit's default is every
    address, ours the loopback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = chain("-p", str(port), "-i", "127.0.0.1", "--filter=delay", "memory", "1M",
                "--run", 'echo "$uri"; nbdinfo --size "$uri"').stdout.split()  # fmt: skip
    assert out == [f"nbd://127.0.0.1:{port}/", str(MiB)]


def test_chain_over_an_upstream(start_node: Any, tmp_path: Path) -> None:
    """--upstream URI instead of a plugin: the filters stand over that server, and what is
    written through them is on it."""
    disk = start_node("memory", "4M")
    data = tmp_path / "data.img"
    data.write_bytes(os.urandom(4 * MiB))
    stats = tmp_path / "stats.json"
    chain("--filter=stats", "--filter=retry", "--upstream", disk.uri, "-U", "-",
          f"statsfile={stats}", "retries=2", "--run", f'nbdcopy {data} "$uri"')  # fmt: skip
    assert hashlib.sha256(read_all(disk.uri)).digest() == hashlib.sha256(data.read_bytes()).digest()
    assert stats.exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--filter=delay", "memory", "1M", "nope=1"], "no layer takes 'nope' (delay, memory"),
        (["--filter=memory", "memory", "1M"], "memory is a plugin, not a filter"),
        (["delay", "delay-read=1"], "delay is a filter: name it with --filter"),
        (["--filter=delay", "-U", "-"], "give a plugin"),
        (["--filter=delay", "memory", "1M", "delay-read=soon"], "delay-read"),
        (["--filter=nosuch", "memory"], "unknown node kind 'nosuch'"),
        (["--upstream", "nbd://localhost", "memory"], "--upstream needs at least one --filter"),
        (["--filter=delay", "--upstream", "nbd://x", "size=1"], "no filter takes 'size=1'"),
    ],
)
def test_chain_refuses_bad_command_lines_before_starting_anything(
    args: list[str], said: str
) -> None:
    res = chain(*args, "--run", "true", check=False)
    assert res.returncode == 1, res
    assert said in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _start(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    sock = tmp_path / "chain.sock"
    proc = subprocess.Popen([*NBDFABRIC, "chain", "--filter=delay", "--filter=stats", "memory",
                             "1M", "--listen", f"unix:{sock}"], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE)  # fmt: skip
    wait_for(lambda: len(_children(proc.pid)) == 3 and sock.exists(), 60, "the chain's nodes")
    run(["qemu-io", "-f", "raw", f"nbd+unix:///?socket={sock}", "-c", "write 0 64k"])
    return proc, sock


def _workdir(pid: int) -> Path:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return Path(args[args.index(b"--ready-file") + 1].decode()).parent


def test_chain_stops_all_its_nodes_on_sigterm(tmp_path: Path) -> None:
    proc, sock = _start(tmp_path)
    nodes = _children(proc.pid)
    workdir = _workdir(nodes[0])
    assert workdir.is_dir()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert not any(alive(pid) for pid in nodes)
    assert not workdir.exists() and not sock.exists()


def test_chain_stops_when_an_inner_node_dies(tmp_path: Path) -> None:
    proc, _ = _start(tmp_path)
    nodes = _children(proc.pid)
    os.kill(nodes[0], signal.SIGKILL)  # the memory node
    try:
        assert proc.wait(60) == 1
    finally:
        proc.kill()
    assert "layer 0 (memory) exited" in proc.stderr.read()  # type: ignore[union-attr]
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in nodes)
