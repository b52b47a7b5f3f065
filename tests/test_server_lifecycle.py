"""A node process from start to exit: --print-uri, --ready-file, several listen addresses, --run,
systemd socket activation and fd:N, keepalive, --max-connections, SIGTERM with requests in flight
(ESHUTDOWN / ERR_SHUTDOWN, exit 0), the other signals that stop it as SIGTERM does, and TLS with
nbdinfo and qemu.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, alive, make_certificates, nbd_connect, run, wait_for

MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054


def node_cmd(*args: str) -> list[str]:
    return [*NBDFABRIC, "node", *args]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[Any]]]:
    started: list[subprocess.Popen[Any]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def spawn(procs: list[subprocess.Popen[Any]], cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    kw.setdefault("stderr", subprocess.PIPE)
    p = subprocess.Popen(cmd, cwd=ROOT, **kw)
    procs.append(p)
    return p


def wait_ready(p: subprocess.Popen[Any], path: Path) -> dict[str, Any]:
    def ready() -> bool:
        if p.poll() is not None:
            raise RuntimeError(f"node exited {p.returncode}: {p.stderr.read() if p.stderr else ''}")
        return path.exists()

    wait_for(ready, 30, "ready file")
    return dict(json.loads(path.read_text()))


def ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# Start-up and addresses ----------------------------------------------------------------------


def test_lifecycle_print_uri_real_port(procs: list[Any]) -> None:
    p = spawn(procs, node_cmd("memory", "1M", "--listen", "127.0.0.1:0", "--print-uri"),
              stdout=subprocess.PIPE, text=True)  # fmt: skip
    uri = p.stdout.readline().strip()
    assert uri.startswith("nbd://127.0.0.1:")
    port = int(uri.rsplit(":", 1)[1].split("/")[0])
    assert port != 0
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["exports"][0]["export-size"] == MiB
    p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0


def test_lifecycle_ready_file_and_many_addresses(procs: list[Any], tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    listens = [f"unix:{tmp_path}/a.sock", "127.0.0.1:0"]
    if ipv6_works():
        listens.append("[::1]:0")
    args = [a for addr in listens for a in ("--listen", addr)]
    p = spawn(procs, node_cmd("memory", "1M", *args, "--ready-file", str(ready)))
    info = wait_ready(p, ready)
    assert info["pid"] == p.pid and info["kind"] == "memory"
    assert info["uri"] == info["uris"][0] and len(info["uris"]) == len(listens)
    assert info["uris"][0].startswith("nbd+unix:///")
    assert not any(u.endswith(":0/") for u in info["uris"]), "port 0 must be resolved"
    for i, uri in enumerate(info["uris"]):
        h = nbd_connect(uri)
        h.pwrite(bytes([i + 1]) * 512, 0)
        assert h.pread(512, 0) == bytes([i + 1]) * 512, "every address serves the same export"
        h.shutdown()
    p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0
    assert not (tmp_path / "a.sock").exists(), "the unix socket is removed at exit"


def test_lifecycle_pidfile_is_written_once_it_serves(procs: list[Any], tmp_path: Path) -> None:
    """-P/--pidfile, as nbdkit's: the pid, once the node serves; a file already there is
    replaced; a place it cannot be written stops the node with a message."""
    pidfile, ready = tmp_path / "node.pid", tmp_path / "ready.json"
    pidfile.write_text("12345\n")  # stale
    p = spawn(procs, node_cmd("memory", "1M", "--listen", f"unix:{tmp_path}/s.sock",
                              "-P", str(pidfile), "--ready-file", str(ready)))  # fmt: skip
    wait_ready(p, ready)
    assert pidfile.read_text() == f"{p.pid}\n"
    p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0
    res = run(node_cmd("memory", "1M", "--listen", f"unix:{tmp_path}/t.sock", "--pidfile",
                       f"{tmp_path}/nowhere/pid"), check=False)  # fmt: skip
    assert res.returncode == 1
    assert f"--pidfile {tmp_path}/nowhere/pid: No such file or directory" in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="-u/-g need a node started as root")
def test_lifecycle_user_and_group_are_taken_once_it_serves(
    procs: list[Any], tmp_path: Path
) -> None:
    """-u nobody, as nbdkit's --user: the node opens its file (root's, mode 0600) and binds its
    socket as root, then runs as nobody with nobody's groups; it still serves and writes the
    file, its unix socket is nobody's (nobody can connect); a user or group that does not exist
    stops it before it binds anything."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    disk = tmp_path / "secret.img"
    disk.write_bytes(os.urandom(MiB))
    disk.chmod(0o600)
    tmp_path.chmod(0o755)
    ready, sock = tmp_path / "ready.json", tmp_path / "s.sock"
    p = spawn(procs, node_cmd("file", str(disk), "--listen", f"unix:{sock}", "-u", "nobody",
                              "--ready-file", str(ready)))  # fmt: skip
    info = wait_ready(p, ready)

    def ids() -> dict[str, str]:
        lines = Path(f"/proc/{p.pid}/status").read_text().splitlines()
        return {k: v.split() for k, v in (ln.split(":", 1) for ln in lines)}  # type: ignore[misc]

    wait_for(lambda: ids()["Uid"][0] == str(nobody.pw_uid), 10, "the node to become nobody")
    assert ids()["Uid"] == [str(nobody.pw_uid)] * 4
    assert ids()["Gid"] == [str(nobody.pw_gid)] * 4
    assert "0" not in ids()["Groups"]  # root's groups are dropped
    assert (sock.stat().st_uid, sock.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    h = nbd_connect(info["uri"])
    assert h.pread(4096, 0) == disk.read_bytes()[:4096]
    h.pwrite(b"w" * 4096, 8192)
    h.flush()
    h.shutdown()
    assert disk.read_bytes()[8192:12288] == b"w" * 4096
    p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0
    # A socket the backend made itself (a pause node's control socket) is given over too.
    up = spawn(procs, node_cmd("memory", "1M", "--listen", f"unix:{tmp_path}/m.sock",
                               "--ready-file", str(tmp_path / "m.json")))  # fmt: skip
    control, ready = tmp_path / "pause.ctl", tmp_path / "p.json"
    paused = spawn(procs, node_cmd("pause", f"pause-control={control}", "--upstream",
                                   wait_ready(up, tmp_path / "m.json")["uri"], "--listen",
                                   f"unix:{tmp_path}/p.sock", "-u", "nobody", "--ready-file",
                                   str(ready)))  # fmt: skip
    wait_ready(paused, ready)
    wait_for(lambda: control.stat().st_uid == nobody.pw_uid, 10, "the control socket's owner")
    for words, message in (
        (["-u", "no-such-user-here"], "-u no-such-user-here: no such user"),
        (["-g", "no-such-group-here"], "-g no-such-group-here: no such group"),
    ):
        res = run(node_cmd("memory", "1M", "--listen", f"unix:{tmp_path}/x.sock", *words),
                  check=False)  # fmt: skip
        assert (res.returncode, res.stderr.strip()) == (1, f"nbdfabric node: {message}")
        assert not (tmp_path / "x.sock").exists()


def _ids(pid: int) -> dict[str, list[str]]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.split() for k, v in (ln.split(":", 1) for ln in lines)}


@pytest.mark.skipif(os.geteuid() != 0, reason="-u/-g need a node started as root")
def test_lifecycle_user_with_workers_the_processes_that_serve_become_the_user(
    procs: list[Any],
) -> None:
    """-u nobody --workers 2 --control: each worker, and the control process that answers for
    them, runs as nobody once it has made its sockets; so does a worker forked to replace one
    killed, and the --run command. The supervisor, which serves no client, stays root to fork
    them and to remove the socket files at the end (nginx's master and workers)."""
    import pwd

    from bench.__main__ import children_of

    nobody = pwd.getpwnam("nobody")
    where = Path(tempfile.mkdtemp(prefix="nbdfabric-user-", dir="/tmp"))
    try:
        where.chmod(0o755)  # nobody's --run command connects to the socket in it
        ready, sock, control = where / "ready.json", where / "w.sock", where / "c.sock"
        p = spawn(procs, node_cmd("memory", "8M", "--workers", "2", "-u", "nobody",
                                  "--listen", f"unix:{sock}", "--control", f"unix:{control}",
                                  "--ready-file", str(ready)))  # fmt: skip
        info = wait_ready(p, ready)
        as_nobody = [str(nobody.pw_uid)] * 4

        def served_by_nobody() -> bool:
            children = children_of(p.pid)
            return len(children) == 3 and all(_ids(c)["Uid"] == as_nobody for c in children)

        wait_for(served_by_nobody, 10, "the workers and the control process to become nobody")
        assert _ids(p.pid)["Uid"] == ["0"] * 4
        for child in children_of(p.pid):
            assert _ids(child)["Gid"] == [str(nobody.pw_gid)] * 4
            assert "0" not in _ids(child)["Groups"]
        assert sock.stat().st_uid == nobody.pw_uid
        for _ in range(4):  # connections land on both workers
            h = nbd_connect(info["uri"])
            h.pwrite(b"u" * 4096, 4096)
            assert h.pread(4096, 4096) == b"u" * 4096
            h.shutdown()
        said = json.loads(run([*NBDFABRIC, "ctl", f"unix:{control}", "info", "--json"]).stdout)
        assert said  # the control process (nobody) reached the workers' sockets
        os.kill(info["workers"][0], signal.SIGKILL)
        wait_for(lambda: info["workers"][0] not in children_of(p.pid) and served_by_nobody(),
                 15, "a replacement worker, as nobody")  # fmt: skip
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
        assert not sock.exists() and not control.exists()
        script = f'test "$(id -u)" = {nobody.pw_uid} && nbdinfo --size "$uri"'
        res = subprocess.run(
            node_cmd("memory", "1M", "--workers", "2", "-u", "nobody", "--listen",
                     f"unix:{where}/r.sock", "--run", script),
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (res.returncode, res.stdout.strip()) == (0, "1048576"), res.stderr
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize("status", [0, 7])
def test_lifecycle_run_captive(tmp_path: Path, status: int) -> None:
    script = f'test -n "$uri" && nbdinfo "$uri" >/dev/null && echo "$uri" && exit {status}'
    res = subprocess.run(
        node_cmd("memory", "1M", "--listen", f"unix:{tmp_path}/r.sock", "--run", script),
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == status, res.stderr
    assert res.stdout.strip() == f"nbd+unix:///?socket={tmp_path}/r.sock"


@pytest.mark.parametrize("listen", ["unix", "tcp"])
def test_lifecycle_run_sets_nbdkits_captive_variables(tmp_path: Path, listen: str) -> None:
    """$nbd, $port, $unixsocket, $exportname and $tls, as nbdkit's --run sets them."""
    address = f"unix:{tmp_path}/r.sock" if listen == "unix" else "127.0.0.1:0"
    script = 'echo "$uri|$nbd|$port|$unixsocket|$exportname|${tls-unset}"'
    res = subprocess.run(
        node_cmd("memory", "1M", "--listen", address, "--export-name", "vm 1", "--run", script),
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    uri, nbd, port, unixsocket, exportname, tls = res.stdout.strip().split("|")
    assert nbd == uri and exportname == "vm 1" and tls == "unset"
    if listen == "unix":
        assert (port, unixsocket) == ("", f"{tmp_path}/r.sock")
    else:
        assert unixsocket == "" and int(port) > 0 and uri.startswith(f"nbd://127.0.0.1:{port}/")


#: What gRPC logs when a process serving it forks (its fork handlers, skipped).
GRPC_FORK_LOG = "fork_posix"


def test_lifecycle_run_with_control_starts_the_command_quietly(tmp_path: Path) -> None:
    """--run with --control: the command, started with vfork (nodes/spawn.py), gets $uri and
    $control and gives its status, and gRPC says nothing on stderr. uvloop forked it, and with
    the control server up gRPC logged `fork_posix.cc:71] Other threads are currently calling
    into gRPC, skipping fork() handlers` at each command."""
    script = f'nbdinfo --size "$uri" && {shlex.join(NBDFABRIC)} health "$control" && exit 5'
    res = subprocess.run(
        node_cmd("memory", "1M", "--listen", f"unix:{tmp_path}/r.sock", "--control",
                 f"unix:{tmp_path}/r.ctl", "--run", script),
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (res.returncode, res.stdout) == (5, f"{MiB}\nSERVING\n"), res.stderr
    assert GRPC_FORK_LOG not in res.stderr and "gRPC" not in res.stderr, res.stderr


def no_pidfd(pid: int) -> int:
    raise OSError(errno.ENOSYS, "pidfd_open: not implemented")


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "thread"])
def test_lifecycle_spawned_commands_are_awaited(
    monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    """nodes/spawn.py in the node's event loop: the status of a command, one killed, and its
    output; on a pidfd, or (Linux before 5.3) a thread."""
    from nodes import spawn
    from nodes.run import event_loop_runner

    if not pidfd:
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)

    async def commands() -> tuple[int, bytes, int]:
        done = await spawn.shell("exit 3")
        talker = await spawn.shell("echo hi; exec sleep 60", stdout=spawn.PIPE)
        assert talker.stdout is not None
        line = await talker.stdout.readline()
        talker.kill()
        return await done.wait(), line, await talker.wait()

    async def main() -> tuple[int, bytes, int]:  # pytest-timeout cannot stop a uvloop loop
        return await asyncio.wait_for(commands(), 30)

    assert event_loop_runner()(main()) == (3, b"hi\n", -signal.SIGKILL)


def test_lifecycle_run_failing_command(tmp_path: Path) -> None:
    res = subprocess.run(
        node_cmd("memory", "1M", "--listen", f"unix:{tmp_path}/r.sock", "--run", "exit 3"),
        cwd=ROOT, capture_output=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 3


def test_lifecycle_systemd_socket_activation() -> None:
    h = nbd.NBD()
    nbdfabric = str(ROOT / ".venv/bin/nbdfabric")
    h.connect_systemd_socket_activation([nbdfabric, "node", "memory", "1M"])
    assert h.get_size() == MiB
    h.pwrite(b"sd" * 256, 0)
    assert h.pread(512, 0) == b"sd" * 256
    h.shutdown()


def test_lifecycle_listen_preopened_fd(procs: list[Any], tmp_path: Path) -> None:
    path = str(tmp_path / "fd.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(8)
    fd = lsock.fileno()
    ready = tmp_path / "ready.json"
    p = spawn(procs, node_cmd("memory", "1M", "--listen", f"fd:{fd}", "--ready-file", str(ready)),
              pass_fds=[fd])  # fmt: skip
    lsock.close()
    info = wait_ready(p, ready)
    assert path in info["uri"]
    run(["nbdinfo", f"nbd+unix:///?socket={path}"])
    p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0


@pytest.mark.parametrize("option", ["--listen", "--control"])
def test_lifecycle_unix_path_too_long_is_refused_readably(option: str, tmp_path: Path) -> None:
    path = "/tmp/" + "s" * 103  # 108 bytes: one more than a sockaddr_un holds
    args = [option, f"unix:{path}"] + (
        ["--listen", f"unix:{tmp_path}/ok"] if option != "--listen" else []
    )
    out = subprocess.run(node_cmd("memory", "1M", *args), cwd=ROOT, capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert out.returncode == 1
    assert (
        f"'unix:{path}': the path is 108 bytes long; a unix socket path may have at most 107"
        in out.stderr
    )
    assert "Traceback" not in out.stderr and not os.path.exists(path)


def test_lifecycle_keepalive_options(procs: list[Any], tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    p = spawn(procs, node_cmd("memory", "1M", "--listen", "127.0.0.1:0", "--keepalive-idle",
                              "30", "--keepalive-interval", "5", "--keepalive-count", "3",
                              "--ready-file", str(ready)))  # fmt: skip
    uri = wait_ready(p, ready)["uri"]
    h = nbd_connect(uri)
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()


def test_lifecycle_max_connections(start_node: Any) -> None:
    node = start_node("memory", "1M", extra=("--max-connections", "2"))
    first, second = nbd_connect(node.uri), nbd_connect(node.uri)
    with pytest.raises(nbd.Error):
        nbd_connect(node.uri)
    assert first.pread(512, 0) == bytes(512)
    first.shutdown()

    def third_connects() -> bool:
        try:
            nbd_connect(node.uri).shutdown()
            return True
        except nbd.Error:
            return False

    wait_for(third_connects, 20, "a free connection slot")
    second.shutdown()


def test_lifecycle_max_connections_burst(start_node: Any) -> None:
    """Connections that pile up while the node is stopped are still limited when it wakes."""
    node = start_node("memory", "1M", extra=("--max-connections", "2"))
    os.kill(node.pid, signal.SIGSTOP)
    socks = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(20)
            s.connect(node.socket)
            socks.append(s)
    finally:
        os.kill(node.pid, signal.SIGCONT)
    greeted = sum(1 for s in socks if s.recv(18, socket.MSG_WAITALL))
    assert greeted == 2
    for s in socks:
        s.close()


# Shutdown ------------------------------------------------------------------------------------

#: A node whose reads wait while a gate file exists: requests stay in flight on demand.
GATED_NODE = '''
import asyncio, os, sys
from nodes import cli
from nodes.plugins.memory import Memory
from nodes.registry import register


@register
class Gated(Memory):
    """Memory whose reads wait while $GATE exists."""

    kind = "gated"

    async def pread(self, buf, offset, flags):
        gate = os.environ["GATE"]
        open(gate + ".entered", "w").close()
        while os.path.exists(gate):
            await asyncio.sleep(0.01)
        return await super().pread(buf, offset, flags)


sys.exit(cli.main(sys.argv[1:]))
'''


def test_lifecycle_sigterm_drains_in_flight(procs: list[Any], tmp_path: Path) -> None:
    gate, ready, sock = tmp_path / "gate", tmp_path / "ready.json", tmp_path / "g.sock"
    gate.touch()
    p = spawn(
        procs,
        [sys.executable, "-c", GATED_NODE, "node", "gated", "1M", "--listen", f"unix:{sock}",
         "--ready-file", str(ready)],
        env={**os.environ, "GATE": str(gate)},
    )  # fmt: skip
    uri = wait_ready(p, ready)["uri"]
    haggling = nbd.NBD()
    haggling.set_opt_mode(True)
    haggling.connect_uri(uri)  # parked in option negotiation
    h = nbd_connect(uri)
    h.pwrite(b"\x42" * 4096, 0)
    errors: list[int] = []
    bufs = [bytearray(4096) for _ in range(5)]
    for buf in bufs:
        h.aio_pread(buf, 0, lambda err: errors.append(err.value) or 1)
    wait_for(lambda: (h.poll(0), Path(f"{gate}.entered").exists())[1], 20, "reads in flight")

    p.send_signal(signal.SIGTERM)
    wait_for(lambda: not sock.exists(), 20, "the listener to close")
    with pytest.raises(nbd.Error) as late:
        h.pwrite(b"x" * 512, 8192)
    assert late.value.errno == "ESHUTDOWN"
    with pytest.raises(nbd.Error) as refused:
        haggling.opt_info()
    assert refused.value.errno == "ESHUTDOWN", "NBD_REP_ERR_SHUTDOWN while draining"

    gate.unlink()  # let the reads in flight finish
    while h.aio_in_flight():
        h.poll(-1)
    assert errors == [0] * 5
    assert all(buf == b"\x42" * 4096 for buf in bufs)
    assert p.wait(20) == 0


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGTERM],
                         ids=lambda s: signal.Signals(s).name)  # fmt: skip
def test_lifecycle_stop_signals_shut_down_cleanly(
    start_node: Any, start_nbdkit: Any, tmp_path: Path, sig: int
) -> None:
    """nbdkit exits cleanly on SIGHUP, SIGINT, SIGQUIT and SIGTERM (qemu-nbd on HUP, INT and
    TERM); a node does too, with a client connected: the writes its writeback cache holds reach
    the disk, the socket file goes, status 0. SIGHUP and SIGQUIT killed it on the spot."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    node = start_node("cache", "cache=writeback", upstreams=[start_nbdkit("file", str(disk)).uri])
    h = nbd_connect(node.uri)
    h.pwrite(b"\x5a" * 65536, 4096)
    assert disk.read_bytes()[4096 : 4096 + 65536] == bytes(65536), "held in the cache"
    assert node.stop(sig) == 0, node.stderr()
    assert not Path(node.socket).exists()
    assert disk.read_bytes()[4096 : 4096 + 65536] == b"\x5a" * 65536, "written back at exit"
    with pytest.raises(nbd.Error):
        h.pread(512, 0)


def test_lifecycle_sighup_ignored_under_nohup(procs: list[Any], tmp_path: Path) -> None:
    """`nohup nbdfabric node ...` outlives the terminal: a SIGHUP ignored when the node starts
    stays ignored (nbdkit's handler would end it there)."""
    sock = tmp_path / "n.sock"
    p = spawn(procs, ["nohup", *node_cmd("memory", "1M", "--listen", f"unix:{sock}")],
              stdout=subprocess.DEVNULL)  # fmt: skip
    wait_for(sock.exists, 30, "the node to listen")
    p.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert p.poll() is None
    nbd_connect(f"nbd+unix:///?socket={sock}").shutdown()
    p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0


# TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls") / "pki"
    make_certificates(directory)
    return directory


def tls_node(procs: list[Any], tmp_path: Path, certs: Path, mode: str) -> tuple[str, int]:
    sock, ready = tmp_path / "tls.sock", tmp_path / "ready.json"
    p = spawn(procs, node_cmd("memory", "4M", "--listen", f"unix:{sock}", "--listen",
                              "127.0.0.1:0", f"--tls={mode}", "--tls-certificates", str(certs),
                              "--ready-file", str(ready)))  # fmt: skip
    uris = wait_ready(p, ready)["uris"]
    port = int(uris[1].rsplit(":", 1)[1].split("/")[0])
    return str(sock), port


def test_lifecycle_tls_require(procs: list[Any], tmp_path: Path, certs: Path) -> None:
    sock, port = tls_node(procs, tmp_path, certs, "require")
    for uri in (f"nbds+unix:///?socket={sock}&tls-certificates={certs}",
                f"nbds://127.0.0.1:{port}/?tls-certificates={certs}"):  # fmt: skip
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MiB
    # Data through TLS in both directions, with qemu's own TLS stack.
    obj = f"tls-creds-x509,id=tls0,dir={certs},endpoint=client"
    for server in (f"server.type=unix,server.path={sock}",
                   f"server.type=inet,server.host=127.0.0.1,server.port={port}"):  # fmt: skip
        opts = f"driver=nbd,{server},tls-creds=tls0,tls-hostname=localhost"
        run(["qemu-io", "--object", obj, "--image-opts", opts, "-c", "write -P 0x5c 0 1M",
             "-c", "read -P 0x5c 0 1M"])  # fmt: skip
        out = run(["qemu-img", "info", "--output=json", "--object", obj, "--image-opts", opts])
        assert json.loads(out.stdout)["virtual-size"] == 4 * MiB
    # A plain client is refused.
    res = run(["nbdinfo", f"nbd+unix:///?socket={sock}"], check=False)
    assert res.returncode != 0
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(sock)
        s.recv(18, socket.MSG_WAITALL)
        s.sendall(struct.pack(">IQII", 3, IHAVEOPT, 3, 0))  # LIST without TLS
        rep = struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))[2]
        assert rep == (1 << 31) | 5, "NBD_REP_ERR_TLS_REQD"


def test_lifecycle_tls_on_allows_both(procs: list[Any], tmp_path: Path, certs: Path) -> None:
    sock, _ = tls_node(procs, tmp_path, certs, "on")
    h = nbd_connect(f"nbd+unix:///?socket={sock}")
    h.pwrite(b"plain" * 100, 0)
    h.shutdown()
    secure = nbd.NBD()
    secure.set_tls(nbd.TLS_REQUIRE)
    secure.set_tls_certificates(str(certs))
    secure.connect_uri(f"nbds+unix:///?socket={sock}")
    assert secure.pread(500, 0) == b"plain" * 100
    big = os.urandom(4 * MiB)
    secure.pwrite(big, 0)
    assert secure.pread(4 * MiB, 0) == big
    secure.shutdown()


def starttls_with(sock: str, behind: bytes) -> socket.socket:
    """A raw client that sent STARTTLS with `behind` in the same write, and read the ACK."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sock)
    s.recv(18, socket.MSG_WAITALL)
    s.sendall(struct.pack(">IQII", 3, IHAVEOPT, 5, 0) + behind)
    assert struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))[1:3] == (5, 1), "STARTTLS ACK"
    return s


def test_lifecycle_tls_plaintext_behind_starttls_is_never_served(
    procs: list[Any], tmp_path: Path, certs: Path
) -> None:
    """An option injected in plaintext right behind STARTTLS (a man in the middle) must not be
    answered as if the client had sent it over TLS (found by test_fuzz_nodes[tls-require],
    NBDFABRIC_FUZZ_SEED=1: the node parsed it out of its handshake buffer after TLS began)."""
    sock, _ = tls_node(procs, tmp_path, certs, "require")
    context = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    with starttls_with(sock, struct.pack(">QII", IHAVEOPT, 8, 0)) as raw:  # STRUCTURED_REPLY
        try:
            secure = context.wrap_socket(raw, server_hostname="localhost")
        except OSError:
            return  # the TLS handshake failed on those bytes: nothing was served
        secure.sendall(struct.pack(">QII", IHAVEOPT, 3, 0))  # LIST
        reply = b""
        while len(reply) < 20:
            reply += secure.recv(20 - len(reply))
        assert struct.unpack(">QIII", reply)[1] == 3, "a reply to the injected option"


def test_lifecycle_tls_hello_behind_starttls_is_read_as_tls(
    procs: list[Any], tmp_path: Path, certs: Path
) -> None:
    """A ClientHello sent right behind STARTTLS, before the ACK came, starts the TLS stream."""
    sock, _ = tls_node(procs, tmp_path, certs, "require")
    context = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    with starttls_with(sock, outgoing.read()) as raw:

        def pump() -> None:
            raw.sendall(outgoing.read())
            data = raw.recv(65536)
            assert data, "the node closed the connection"
            incoming.write(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        tls.write(struct.pack(">QII", IHAVEOPT, 3, 0))  # LIST, over TLS
        reply = b""
        while len(reply) < 20:
            try:
                reply += tls.read(20 - len(reply))
            except ssl.SSLWantReadError:
                pump()
        assert struct.unpack(">QIII", reply)[1] == 3


@pytest.fixture(scope="module")
def peer_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """For --tls-verify-peer: the node's directory (with a client certificate of its CA), one
    with the CA alone (no client certificate), and one with a client certificate of another
    CA; each in the layout libnbd and qemu read (ca-cert.pem, client-cert.pem, client-key.pem)."""
    root = tmp_path_factory.mktemp("peer")
    make_certificates(root / "pki", client=True)
    make_certificates(root / "other", client=True, ca_name="another CA")
    dirs = {"good": root / "pki", "none": root / "none", "foreign": root / "foreign"}
    for d in (dirs["none"], dirs["foreign"]):
        d.mkdir()
        shutil.copy(root / "pki" / "ca-cert.pem", d)
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(root / "other" / name, dirs["foreign"])
    return dirs


def test_lifecycle_tls_verify_peer(
    procs: list[Any], tmp_path: Path, peer_certs: dict[str, Path]
) -> None:
    """--tls-verify-peer serves clients whose certificate its CA signed, and refuses the
    others with the TLS alert that says why (certificate required, unknown CA): the client
    reports that, not a connection cut short, and the node logs it."""
    sock, ready = tmp_path / "peer.sock", tmp_path / "ready.json"
    p = spawn(procs, node_cmd("memory", "4M", "--listen", f"unix:{sock}", "--tls=require",
                              "--tls-certificates", str(peer_certs["good"]), "--tls-verify-peer",
                              "--ready-file", str(ready)))  # fmt: skip
    wait_ready(p, ready)
    good = peer_certs["good"]
    obj = f"tls-creds-x509,id=tls0,dir={good},endpoint=client"
    opts = f"driver=nbd,server.type=unix,server.path={sock},tls-creds=tls0,tls-hostname=localhost"
    run(["qemu-io", "--object", obj, "--image-opts", opts, "-c", "write -P 0x3c 0 64K",
         "-c", "read -P 0x3c 0 64K"])  # fmt: skip
    for name in ("none", "foreign"):
        res = run(["nbdinfo", "--size", f"nbds+unix:///?socket={sock}&tls-certificates="
                   f"{peer_certs[name]}"], check=False)  # fmt: skip
        assert res.returncode != 0 and "alert" in res.stderr, (name, res.stderr)
    context = ssl.create_default_context(cafile=str(good / "ca-cert.pem"))
    foreign = ssl.create_default_context(cafile=str(good / "ca-cert.pem"))
    foreign.load_cert_chain(peer_certs["foreign"] / "client-cert.pem",
                            peer_certs["foreign"] / "client-key.pem")  # fmt: skip
    for ctx, alert in ((context, "CERTIFICATE_REQUIRED"), (foreign, "UNKNOWN_CA")):
        # TLS 1.3: the client's side of the handshake ends before the node has seen its
        # certificate; the alert comes with the first read.
        with (
            starttls_with(str(sock), b"") as raw,
            pytest.raises(ssl.SSLError, match=alert),
            ctx.wrap_socket(raw, server_hostname="localhost") as secure,
        ):
            secure.sendall(struct.pack(">QII", IHAVEOPT, 3, 0))  # LIST
            secure.recv(20)
    assert run(["nbdinfo", "--size", f"nbds+unix:///?socket={sock}&tls-certificates={good}"]
               ).stdout.strip() == str(4 * MiB)  # fmt: skip
    p.terminate()
    assert p.wait(20) == 0
    assert p.stderr is not None
    log = p.stderr.read().decode()
    assert log.count("TLS handshake failed") == 4, log


# Run by another program ----------------------------------------------------------------------


def test_lifecycle_single_client_on_stdin(tmp_path: Path) -> None:
    """-s, as nbdkit -s: libnbd's connect_command runs the node with the client's socket as
    stdin and stdout; it serves that client and exits when the client is done."""
    pidfile = tmp_path / "pid"
    h = nbd.NBD()
    h.connect_command(["sh", "-c", f'echo $$ > {pidfile}; exec "$@"', "sh",
                       *node_cmd("-s", "memory", "1M")])  # fmt: skip
    pid = int(pidfile.read_text())
    assert h.get_size() == MiB and h.can_trim()
    h.pwrite(b"\x42" * 65536, 4096)
    assert h.pread(65536, 4096) == b"\x42" * 65536
    h.shutdown()
    wait_for(lambda: not alive(pid), 15, "the node to exit after its client")


def test_lifecycle_single_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    res = run(node_cmd("-s", "memory", "1M", "--listen", f"unix:{tmp_path}/n.sock"), check=False)
    assert res.returncode == 1 and "--listen" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(node_cmd("-s", "memory", "1M"), cwd=ROOT, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 1 and "must be a socket" in res.stderr, res.stderr


def test_lifecycle_sigterm_while_starting_still_stops_cleanly(tmp_path: Path) -> None:
    """A SIGTERM the moment the NBD socket is bound, while the node still starts its gRPC
    control server: the node finishes starting, then stops as on any SIGTERM (exit 0, socket
    files removed). The signal's default action used to end it there, leaving the files."""
    sock, ctl = tmp_path / "n.sock", tmp_path / "c.sock"
    p = subprocess.Popen(node_cmd("memory", "1M", "--listen", f"unix:{sock}",
                                  "--control", f"unix:{ctl}"),
                         cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert sock.exists() and not ctl.exists()  # in the window: the control comes later
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0, p.stderr.read() if p.stderr else ""
        assert not sock.exists() and not ctl.exists()
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("option", [True, False], ids=["exit-with-parent", "without"])
def test_lifecycle_exit_with_parent(tmp_path: Path, option: bool) -> None:
    """--exit-with-parent: a parent killed with -9 takes the node with it (a clean exit: the
    socket file goes too); without the option, the node outlives it."""
    sock = tmp_path / "n.sock"
    cmd = node_cmd(*(["--exit-with-parent"] if option else []), "memory", "1M",
                   "--listen", f"unix:{sock}")  # fmt: skip
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "p = subprocess.Popen(sys.argv[1:]); print(p.pid, flush=True); time.sleep(3600)",
         *cmd], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        wait_for(sock.exists, 30, "the node to listen")
        parent.kill()
        parent.wait()
        if option:
            wait_for(lambda: not alive(pid), 15, "the node to exit with its parent")
            assert not sock.exists()
        else:
            time.sleep(2)
            assert alive(pid)
            nbd_connect(f"nbd+unix:///?socket={sock}").shutdown()
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
