"""The ssh plugin against a private OpenSSH server (tests/ssh_server.py: sshd on 127.0.0.1,
its own keys, internal-sftp) and against nbdkit's ssh plugin over the same file: same size,
same flags, same bytes; writes land in the remote file; a lost server fails requests with EIO
and the node serves again once it is back.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from conftest import CAPABILITIES, NBDFABRIC, ROOT, capabilities, nbd_connect, run, sha, wait_for

from bench.ssh_server import Sshd, descendants, free_port, usable

SIZE = 4 << 20


def need_sshd() -> None:
    """Skip where no private sshd can run without root; as root (CI) its absence fails."""
    why = usable()
    if why is not None:
        if os.geteuid() != 0:
            pytest.skip(why)
        pytest.fail(why)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    need_sshd()
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A server of the test's own, to stop and start again."""
    need_sshd()
    server = Sshd(tmp_path / "sshd")
    yield server
    server.stop()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """4 MiB less 1000 bytes (a tail that is no whole sector): random data, a run of zeros."""
    data = bytearray(os.urandom(SIZE - 1000))
    data[1 << 20 : 2 << 20] = bytes(1 << 20)
    path = tmp_path / "remote" / "disk.img"
    path.parent.mkdir()
    path.write_bytes(data)
    return path


def node_fails(*args: str) -> str:
    """Start an ssh node that must refuse to start: its message."""
    out = subprocess.run(
        [*NBDFABRIC, "node", "ssh", *args, "--listen", "unix:/tmp/nbdfabric-never.sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and "[Errno" not in out.stderr, out.stderr
    return out.stderr


def test_ssh_serves_the_remote_file_byte_for_byte(start_node, sshd, image, tmp_path) -> None:
    node = start_node("ssh", *sshd.args(), str(image))
    info = capabilities(node.uri)
    assert info["export-size"] == image.stat().st_size
    assert not info["is_read_only"] and info["can_flush"] and info["can_multi_conn"]
    back = tmp_path / "back.img"
    run(["nbdcopy", node.uri, str(back)])
    assert sha(back.read_bytes()) == sha(image.read_bytes())
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), node.uri])


def test_ssh_writes_land_in_the_remote_file(start_node, sshd, image, tmp_path) -> None:
    node = start_node("ssh", *sshd.args(), str(image))
    expected = bytearray(image.read_bytes())
    run(["qemu-io", "-f", "raw", "-t", "writeback", node.uri,
         "-c", "write -P 0xab 4096 65536",
         "-c", "write -f -P 0xcd 1000000 3000",      # FUA: a flush after it
         "-c", "write -z 2000000 100000",            # zeros, written by the node
         "-c", "aio_write -P 0x11 3000000 4096", "-c", "aio_flush",
         "-c", "read -P 0xab 4096 65536"])  # fmt: skip
    expected[4096 : 4096 + 65536] = b"\xab" * 65536
    expected[1000000:1003000] = b"\xcd" * 3000
    expected[2000000:2100000] = bytes(100000)
    expected[3000000:3004096] = b"\x11" * 4096
    assert sha(image.read_bytes()) == sha(bytes(expected))
    # nbdcopy over several connections (multi-conn), a whole new image with an odd tail.
    local = tmp_path / "local.img"
    local.write_bytes(os.urandom(len(expected)))
    run(["nbdcopy", "--flush", str(local), node.uri])
    assert sha(image.read_bytes()) == sha(local.read_bytes())
    h = nbd_connect(node.uri)
    with pytest.raises(nbd.Error) as err:  # fast zero: refused at once, as nbdkit's
        h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert err.value.errnum == 95  # ENOTSUP
    h.shutdown()


def test_ssh_read_only_refuses_writes(start_node, sshd, image) -> None:
    node = start_node("ssh", *sshd.args(), str(image), extra=("--read-only",))
    info = capabilities(node.uri)
    assert info["is_read_only"] and not info["can_zero"] and not info["can_fua"]
    before = sha(image.read_bytes())
    h = nbd_connect(node.uri)
    with pytest.raises(nbd.Error) as err:
        h.pwrite(b"x" * 512, 0)
    assert err.value.errnum == 1  # EPERM
    assert h.pread(4096, 0) == image.read_bytes()[:4096]
    h.shutdown()
    assert sha(image.read_bytes()) == before


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_ssh_like_nbdkit_ssh(start_node, start_nbdkit, sshd, image, read_only) -> None:
    """Same size, same flags, the same random reads (and past the end, the same error) through
    our node and `nbdkit ssh` over the same remote file. Both advertise multi-conn, FUA and
    fast zero (emulated: a fast zero fails at once), flush (fsync@openssh.com), no trim, no
    cache."""
    flags = ("--read-only",) if read_only else ()
    ours = start_node("ssh", *sshd.args(), str(image), extra=flags)
    theirs = start_nbdkit(*(("-r",) if read_only else ()), "ssh", *sshd.args(), str(image))
    assert capabilities(ours.uri) == capabilities(theirs.uri), CAPABILITIES
    a, b = nbd_connect(ours.uri, strict=False), nbd_connect(theirs.uri, strict=False)
    data = image.read_bytes()
    size = len(data)
    rnd = random.Random(11)
    for _ in range(100):
        offset = rnd.randrange(size)
        length = rnd.randint(1, min(size - offset, 400_000))
        assert a.pread(length, offset) == b.pread(length, offset) == data[offset : offset + length]
    for h in (a, b):
        with pytest.raises(nbd.Error) as err:  # past the end: EINVAL from both
            h.pread(512, size - 100)
        assert err.value.errnum == 22
        h.shutdown()


def test_ssh_writes_like_nbdkit_ssh(start_node, start_nbdkit, sshd, image, tmp_path) -> None:
    """The same qemu-io writes through each onto a copy of the same file: the same bytes."""
    copy = image.with_name("copy.img")
    copy.write_bytes(image.read_bytes())
    ours = start_node("ssh", *sshd.args(), str(image))
    theirs = start_nbdkit("ssh", *sshd.args(), str(copy))
    script = ["-c", "write -P 0x42 0 1000", "-c", "write -z 5000 70000", "-c", "flush",
              "-c", f"write -f -P 0x24 {SIZE - 2000} 1000"]  # fmt: skip
    for uri in (ours.uri, theirs.uri):
        run(["qemu-io", "-f", "raw", "-t", "writeback", uri, *script])
    assert sha(image.read_bytes()) == sha(copy.read_bytes())


def test_ssh_create_makes_the_file_with_size_and_mode(start_node, sshd, image, tmp_path) -> None:
    """create=true: a new file of create-size with create-mode, and an existing one replaced
    (its data lost, as nbdkit's manual says); made once: what clients write stays."""
    new = image.with_name("new.img")
    node = start_node("ssh", *sshd.args(), str(new), "create=true", "create-size=3M",
                      "create-mode=0640")  # fmt: skip
    assert capabilities(node.uri)["export-size"] == 3 << 20
    assert new.stat().st_size == 3 << 20 and stat.S_IMODE(new.stat().st_mode) == 0o640
    run(["qemu-io", "-f", "raw", node.uri, "-c", "write -P 0x77 0 4096"])
    run(
        ["qemu-io", "-f", "raw", node.uri, "-c", "read -P 0x77 0 4096", "-c", "read -P 0 4096 4096"]
    )  # fmt: skip: a second client sees the first's write
    assert new.read_bytes()[:4096] == b"\x77" * 4096
    replaced = start_node("ssh", *sshd.args(), str(image), "create=true", "create-size=1M")
    assert capabilities(replaced.uri)["export-size"] == 1 << 20
    assert image.read_bytes() == bytes(1 << 20)
    assert stat.S_IMODE(image.stat().st_mode) == 0o644  # an existing file keeps its mode
    assert "create=true needs create-size=SIZE" in node_fails(*sshd.args(), "x", "create=true")


def test_ssh_workers_create_once_and_share_the_file(start_node, sshd, image, tmp_path) -> None:
    """--workers 2 with create=true: made once before the workers start (a worker's own
    start would truncate what the other one's clients wrote); nbdcopy's connections spread
    over both workers and land in the one file."""
    new = image.with_name("workers.img")
    node = start_node("ssh", *sshd.args(), str(new), "create=true", "create-size=2M",
                      extra=("--workers", "2"))  # fmt: skip
    local = tmp_path / "local.img"
    local.write_bytes(os.urandom(2 << 20))
    run(["nbdcopy", "--flush", str(local), node.uri])
    assert sha(new.read_bytes()) == sha(local.read_bytes())
    # Workers killed are replaced from the supervisor, which created the file: the new ones
    # open it as it is (a worker that created it itself would truncate it again).
    workers = set(descendants(node.pid))
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(set(descendants(node.pid)) - workers) == 2, 30, "new workers", 0.1)
    out = subprocess.run(["nbdcopy", node.uri, "-"], capture_output=True, check=True)
    assert sha(out.stdout) == sha(local.read_bytes())


def test_ssh_compression_and_expansion(start_node, sshd, image, tmp_path) -> None:
    """compression=true negotiates zlib (ctl info says which); %r in identity= is the remote
    user, as libssh expands it."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "root.key").write_bytes(sshd.client_key.read_bytes())
    os.chmod(keys / "root.key", 0o600)
    args = [a for a in sshd.args() if not a.startswith("identity=")]
    node = start_node("ssh", *args, f"identity={keys}/%r.key", "compression=true", str(image),
                      control=True)  # fmt: skip
    assert sha(nbd_connect(node.uri).pread(SIZE - 1000, 0)) == sha(image.read_bytes())
    status = json.loads(run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout)["status"]
    assert status["compression"] == "zlib@openssh.com"
    plain = start_node("ssh", *sshd.args(), str(image), control=True)
    status = json.loads(run([*NBDFABRIC, "ctl", plain.control, "info", "--json"]).stdout)["status"]
    assert status["compression"] == "none"
    # AES-GCM first (asyncssh's chacha20-poly1305 costs twice the CPU: PREFERRED_CIPHERS).
    assert status["cipher"] == "aes128-gcm@openssh.com"


def test_ssh_reads_an_ssh_config(start_node, sshd, image, tmp_path) -> None:
    """config=FILE: a host alias with its address, port, user and key, as ssh(1) reads it."""
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host disks\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
        f"  IdentityFile {sshd.client_key}\n"
    )
    node = start_node("ssh", "host=disks", f"config={config}",
                      f"known-hosts={sshd.known_hosts}", str(image))  # fmt: skip
    assert sha(nbd_connect(node.uri).pread(SIZE - 1000, 0)) == sha(image.read_bytes())
    # A config that says Ciphers is followed, not the node's preference.
    with config.open("a") as f:
        f.write("  Ciphers chacha20-poly1305@openssh.com\n")
    node = start_node("ssh", "host=disks", f"config={config}",
                      f"known-hosts={sshd.known_hosts}", str(image), control=True)  # fmt: skip
    assert sha(nbd_connect(node.uri).pread(SIZE - 1000, 0)) == sha(image.read_bytes())
    status = json.loads(run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout)["status"]
    assert status["cipher"] == "chacha20-poly1305@openssh.com"


def _replace(args: list[str], key: str, value: str | None) -> list[str]:
    kept = [a for a in args if not a.startswith(f"{key}=")]
    return kept if value is None else [*kept, f"{key}={value}"]


def test_ssh_refuses_to_start_with_a_reason(sshd, image, tmp_path) -> None:
    """What nbdkit tells each client at its handshake (it connects per client), this node
    says once, at start, and exits 1."""
    args = sshd.args()
    stranger = tmp_path / "stranger_known_hosts"
    other_key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)],
                   check=True)  # fmt: skip
    pub = " ".join(other_key.with_suffix(".pub").read_text().split()[:2])
    stranger.write_text(f"[127.0.0.1]:{sshd.port} {pub}\n")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    cases = [
        (_replace(args, "known-hosts", str(stranger)), "host key is not verified"),
        (_replace(args, "known-hosts", str(empty)), "add it to known-hosts"),
        (_replace(args, "identity", str(other_key)), "cannot log in: Permission denied"),
        (_replace(args, "port", "1"), "ssh root@127.0.0.1:1: Connection refused"),
        (_replace(args, "host", "no-such-host.invalid"), "no-such-host.invalid"),
        (_replace(args, "identity", str(tmp_path / "none")), "identity="),
        (_replace(args, "known-hosts", str(tmp_path / "none")), "known-hosts="),
        (_replace(args, "identity", str(other_key) + ".pub"), "not a private key"),
        (_replace(args, "port", "x-no-such-service"), "bad value 'x-no-such-service' for 'port'"),
        ([*args, "create-mode=0999"], "bad value '0999' for 'create-mode'"),
        ([*args, "password=-x"], "-FD needs a file descriptor"),
        ([*args, f"password=+{tmp_path}/none"], "cannot open the file"),
    ]
    for words, message in cases:
        assert message in node_fails(*words, str(image)), words
    assert f"{tmp_path}/missing.img: No such file" in node_fails(
        *args, str(tmp_path / "missing.img")
    )


def test_ssh_verify_remote_host_false_takes_any_key(start_node, sshd, image, tmp_path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    args = _replace(sshd.args(), "known-hosts", str(empty))
    node = start_node("ssh", *args, "verify-remote-host=false", str(image))
    assert sha(nbd_connect(node.uri).pread(SIZE - 1000, 0)) == sha(image.read_bytes())


def test_ssh_password_is_never_shown(start_node, sshd, image) -> None:
    """A password given (the key logs in first; sshd here takes no passwords) is masked."""
    node = start_node("ssh", *sshd.args(), "password=hunter2", str(image), control=True)
    text = run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout
    params = {p["name"]: p["value"] for p in json.loads(text)["params"]}
    assert params["password"] == "***" and "hunter2" not in text


def test_ssh_server_outage_fails_requests_then_recovers(start_node, own_sshd, image) -> None:
    """sshd killed (listener and sessions): requests fail with EIO, the node stays up and
    reports NOT_SERVING; sshd back on the same port: the same client reads and writes again
    (nbdkit's plugin would need the client to reconnect)."""
    node = start_node("ssh", *own_sshd.args(), str(image), control=True)
    h = nbd_connect(node.uri)
    data = image.read_bytes()
    assert h.pread(65536, 0) == data[:65536]

    def health() -> str:
        return run([*NBDFABRIC, "health", node.control], check=False).stdout.strip()

    own_sshd.stop()
    wait_for(lambda: health() == "NOT_SERVING", 20, "the node to see the server gone", 0.2)
    for call in (lambda: h.pread(65536, 65536), lambda: h.pwrite(b"y" * 512, 0)):
        with pytest.raises(nbd.Error) as err:
            call()
        assert err.value.errnum == 5  # EIO
    assert node.proc.poll() is None
    own_sshd.start()  # the same port, host key and client key
    assert h.pread(65536, 65536) == data[65536:131072]
    h.pwrite(b"z" * 512, 0)
    h.flush()
    assert image.read_bytes()[:512] == b"z" * 512
    wait_for(lambda: health() == "SERVING", 20, "the node to be healthy again", 0.2)
    info = run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout
    status = json.loads(info)["status"]
    assert status["errors"] >= 2 and status["reconnects"] == 1 and status["connected"]
    h.shutdown()


def test_ssh_the_remote_file_shrunk_is_not_taken_back(start_node, own_sshd, image) -> None:
    """A reconnection that finds the file smaller than clients were told fails the request
    (reads past the new end could not be served)."""
    node = start_node("ssh", *own_sshd.args(), str(image), control=True)
    h = nbd_connect(node.uri)
    own_sshd.stop()
    with open(image, "r+b") as f:
        f.truncate(4096)
    own_sshd.start()
    with pytest.raises(nbd.Error) as err:
        h.pread(512, 0)
    assert err.value.errnum == 5
    info = json.loads(run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout)
    assert "smaller than the" in info["status"]["last_error"]
    h.shutdown()


@pytest.fixture(scope="module")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """asyncssh's SSH server (tests/asyncssh_server.py) letting in user `u` with password
    `p`: the ssh node's params that reach it, but the password."""
    directory = tmp_path_factory.mktemp("pwserver")
    key = directory / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    port = free_port()
    pub = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    (directory / "known_hosts").write_text(f"[127.0.0.1]:{port} {pub}\n")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "asyncssh_server.py"), str(port), str(key), "u", "p"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield ["host=127.0.0.1", f"port={port}", "user=u",
               f"known-hosts={directory / 'known_hosts'}"]  # fmt: skip
    finally:
        proc.kill()
        proc.wait()


def test_ssh_password_forms_log_in(start_node, password_server, image, tmp_path) -> None:
    """password= in nbdkit's forms (nodes/passwords.py): +FILE (its first line, a `\\r`
    kept), -FD (the first line of an inherited descriptor, read once, before --workers
    fork: every worker logs in with it), the password itself; a wrong one is named."""
    digest = sha(image.read_bytes())
    password = tmp_path / "password"
    password.write_text("p\nnot this line\n")
    node = start_node("ssh", *password_server, f"password=+{password}", str(image))
    assert sha(nbd_connect(node.uri).pread(SIZE - 1000, 0)) == digest
    r, w = os.pipe()
    os.write(w, b"p\n")
    os.close(w)
    try:
        node = start_node("ssh", *password_server, f"password=-{r}", str(image),
                          extra=("--workers", "2"), pass_fds=(r,))  # fmt: skip
    finally:
        os.close(r)
    out = subprocess.run(["nbdcopy", node.uri, "-"], capture_output=True, check=True)
    assert sha(out.stdout) == digest
    crlf = tmp_path / "crlf"
    crlf.write_bytes(b"p\r\n")
    for wrong in (f"password=+{crlf}", "password=q"):
        said = node_fails(*password_server, wrong, str(image))
        assert "ssh u@127.0.0.1" in said and "cannot log in" in said
