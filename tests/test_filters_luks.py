"""The luks filter: the plaintext of a LUKSv1 image on the upstream, read and write.

qemu is the oracle: images are made by qemu-img (aes-xts-plain64 as it makes them by default,
and the other cipher specs the node serves), data is put in with qemu-io's luks driver, what
the node serves over a `file` node must be what `qemu-img convert` decrypts, and what is
written through the node must be what qemu then reads. nbdkit's luks filter is the peer over
the same images where it opens them: the same capabilities, the same plaintext, and, after the
same writes, the very same ciphertext (XTS and CBC with these IVs are deterministic).

qemu-img calibrates PBKDF2 for about 2 s per image whatever `iter-time` says, so the images are
made once per module, side by side; `iter-time=10` keeps opening them quick.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import random
import select
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import (
    NBDFABRIC,
    ROOT,
    Proc,
    capabilities,
    export_info,
    mem,
    nbd_connect,
    run,
    sha,
    wait_for,
)

from nodes.filters._luks import (
    HEADER,
    HEADER_SIZE,
    KEY_SLOT,
    SLOT_DISABLED,
    CipherSpec,
    LuksError,
    SectorCipher,
    parse_header,
)
from nodes.filters.luks import Luks, LuksParams

KiB, MiB = 1 << 10, 1 << 20
StartNode = Callable[..., Proc]
PASS = "sesame"
OTHER = "open up"  #: the second key slot's passphrase (the `slots` image)


@dataclass(frozen=True)
class Recipe:
    options: str  #: qemu-img create -o, besides the secret and iter-time
    size: int = MiB
    nbdkit: bool = True  #: nbdkit 1.32 opens it (it has no essiv)


RECIPES = {
    "default": Recipe("", 4 * MiB),  # aes-256-xts-plain64, sha256: what qemu-img makes
    # A 128-bit CBC key with an essiv IV (its AES-256 key from sha256), sha512 for PBKDF2.
    "aes128-cbc-essiv": Recipe(
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha512",
        nbdkit=False,
    ),
    # Two 128-bit XTS keys, the 32-bit plain IV, md5 for PBKDF2.
    "aes128-xts-plain": Recipe("cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain,hash-alg=md5"),
}
#: What qemu-io writes into each image before the tests read it.
FILL = ["write -P 0x5a 0 512K", "write -P 0xa5 700000 100000"]


def secret(name: str = "sec0", data: str = PASS) -> list[str]:
    return ["--object", f"secret,id={name},data={data}"]


def image_opts(path: Path) -> str:
    return f"driver=luks,key-secret=sec0,file.filename={path}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The images (never written by a test: copy them first), made side by side."""
    directory = tmp_path_factory.mktemp("luks")
    paths = {name: directory / f"{name}.luks" for name in RECIPES}
    procs = []
    for name, path in paths.items():
        recipe = RECIPES[name]
        opts = ",".join(filter(None, ["key-secret=sec0,iter-time=10", recipe.options]))
        cmd = ["qemu-img", "create", "-q", "-f", "luks", *secret(), "-o", opts, str(path),
               str(recipe.size)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    for path in paths.values():
        io = [arg for op in FILL for arg in ("-c", op)]
        run(["qemu-io", *secret(), "--image-opts", image_opts(path), *io])
    # A second passphrase in key slot 3 of a copy of the default image.
    paths["slots"] = directory / "slots.luks"
    run(["cp", "--sparse=always", str(paths["default"]), str(paths["slots"])])
    run(["qemu-img", "amend", *secret(), *secret("sec1", OTHER), "-o",
         "state=active,new-secret=sec1,keyslot=3,iter-time=10", "--image-opts",
         image_opts(paths["slots"])])  # fmt: skip
    return paths


def copy(images: dict[str, Path], name: str, to: Path) -> Path:
    """A copy as sparse as the image (the payload qemu never wrote is a hole in the file)."""
    to.mkdir(exist_ok=True)
    run(["cp", "--sparse=always", str(images[name]), str(to / f"{name}.luks")])
    return to / f"{name}.luks"


def qemu_plain(path: Path) -> bytes:
    """What qemu decrypts: the oracle."""
    out = path.with_suffix(".qemu.raw")
    run(["qemu-img", "convert", *secret(), "--image-opts", image_opts(path), "-O", "raw",
         str(out)])  # fmt: skip
    return out.read_bytes()


def serve(start_node: StartNode, path: Path, *args: str, read_only: bool = False,
          control: bool = False) -> Proc:  # fmt: skip
    """file -> luks over the image."""
    up = start_node("file", str(path), extra=("--read-only",) if read_only else ())
    words = args or (f"passphrase={PASS}",)
    return start_node("luks", *words, upstreams=[up.uri], control=control)


def nbdkit_luks(start_nbdkit: Any, path: Path, *extra: str) -> Proc:
    return start_nbdkit(*extra, "--filter=luks", "file", str(path), f"passphrase={PASS}")


def read_export(uri: str, out: Path) -> bytes:
    run(["nbdcopy", uri, str(out)])
    return out.read_bytes()


def failed_start(start_node: StartNode, *args: str, upstreams: tuple[str, ...] = (),
                 **kw: Any) -> str:  # fmt: skip
    """A luks node that must exit 1 at start: its stderr."""
    node = start_node("luks", *args, upstreams=upstreams, wait=False, **kw)
    try:
        assert node.proc.wait(20) == 1, node.stderr()
    except subprocess.TimeoutExpired:
        pytest.fail(f"the node did not stop at start: {node.stderr()}")
    err = node.stderr()
    assert "Traceback" not in err, err
    return err


# The node against qemu and nbdkit ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(RECIPES))
def test_luks_reads_what_qemu_decrypts(
    images: dict[str, Path], start_node: StartNode, start_nbdkit: Any, tmp_path: Path, name: str
) -> None:
    path = images[name]
    want = qemu_plain(copy(images, name, tmp_path / "q"))
    assert want[:512] == b"\x5a" * 512 and len(want) == RECIPES[name].size
    ours = read_export(serve(start_node, path, read_only=True).uri, tmp_path / "ours.raw")
    assert sha(ours) == sha(want)
    if RECIPES[name].nbdkit:
        theirs = read_export(nbdkit_luks(start_nbdkit, path, "-r").uri, tmp_path / "nbdkit.raw")
        assert sha(theirs) == sha(want)


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_luks_capabilities_and_size_match_nbdkit(
    images: dict[str, Path], start_node: StartNode, start_nbdkit: Any, tmp_path: Path,
    read_only: bool,
) -> None:  # fmt: skip
    path = copy(images, "default", tmp_path)
    ours = serve(start_node, path, read_only=read_only)
    theirs = nbdkit_luks(start_nbdkit, path, *(["-r"] if read_only else []))
    assert capabilities(ours.uri) == capabilities(theirs.uri)
    assert capabilities(ours.uri)["export-size"] == 4 * MiB
    assert export_info(ours.uri)["block_size_minimum"] == 512
    assert export_info(theirs.uri)["block_size_minimum"] == 512
    # Everything is data (ciphertext holes are not plaintext holes).
    maps = [json.loads(run(["nbdinfo", "--map", "--json", p.uri]).stdout) for p in (ours, theirs)]
    assert maps[0] == maps[1] == [{"offset": 0, "length": 4 * MiB, "type": 0,
                                   "description": "data"}]  # fmt: skip


#: qemu-io over NBD: aligned and unaligned writes, zeroes (which may trim, and which may not),
#: the last sector. qemu honours the 512-byte minimum, so it does its own read-modify-write.
WRITES = [
    "write -P 0x11 0 64K",
    "write -P 0x22 1000 3000",
    "write -z 128K 64K",
    "write -z -u 600000 5000",
    "write -P 0x33 4193792 512",
    "write -P 0x44 2M 1M",
]


def apply(model: bytearray, op: str) -> None:
    words = op.split()
    offset, length = _number(words[-2]), _number(words[-1])
    fill = 0 if "-z" in words else int(words[words.index("-P") + 1], 16)
    model[offset : offset + length] = bytes([fill]) * length


def _number(text: str) -> int:
    for suffix, scale in (("K", KiB), ("M", MiB)):
        if text.endswith(suffix):
            return int(text[:-1]) * scale
    return int(text)


def test_luks_writes_are_what_qemu_reads_and_what_nbdkit_writes(
    images: dict[str, Path], start_node: StartNode, start_nbdkit: Any, tmp_path: Path
) -> None:
    ours_img = copy(images, "default", tmp_path / "ours")
    theirs_img = copy(images, "default", tmp_path / "theirs")
    model = bytearray(qemu_plain(copy(images, "default", tmp_path / "q")))
    ours = serve(start_node, ours_img)
    theirs = nbdkit_luks(start_nbdkit, theirs_img)
    io = [arg for op in WRITES for arg in ("-c", op)]
    for node in (ours, theirs):
        run(["qemu-io", "-f", "raw", "-t", "writeback", node.uri, *io, "-c", "flush"])
    for op in WRITES:
        apply(model, op)
    ours.stop()
    theirs.stop()
    # qemu decrypts what we encrypted, patterns and all.
    checks = ["read -P 0x11 0 1000", "read -P 0x22 1000 3000", "read -P 0 128K 64K",
              "read -P 0 600000 5000", "read -P 0x33 4193792 512"]  # fmt: skip
    run(["qemu-io", *secret(), "--image-opts", image_opts(ours_img),
         *(a for c in checks for a in ("-c", c))])  # fmt: skip
    assert sha(qemu_plain(ours_img)) == sha(bytes(model))
    # The same writes leave the same ciphertext as nbdkit's.
    assert sha(ours_img.read_bytes()) == sha(theirs_img.read_bytes())


def test_luks_zeroes_are_encrypted_zeros_not_holes(
    images: dict[str, Path], start_node: StartNode, tmp_path: Path
) -> None:
    """A zero with or without NO_HOLE: the plaintext reads zeros (by qemu too), and the
    ciphertext below is not zeros (a hole there would decrypt to garbage)."""
    path = copy(images, "default", tmp_path)
    payload = parse_header(path.read_bytes()[:HEADER_SIZE], path.stat().st_size).payload_offset
    node = serve(start_node, path)
    h = nbd_connect(node.uri)
    h.zero(64 * KiB, 0)
    h.zero(64 * KiB, 256 * KiB, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(64 * KiB, 0) == bytes(64 * KiB) == h.pread(64 * KiB, 256 * KiB)
    assert not h.can_trim() and not h.can_fast_zero()
    h.shutdown()
    node.stop()
    data = path.read_bytes()
    for at in (0, 256 * KiB):
        below = data[payload + at : payload + at + 64 * KiB]
        assert below.count(0) < len(below) // 2, f"zeros at {at} in the ciphertext"
    assert qemu_plain(path)[: 64 * KiB] == bytes(64 * KiB)


def _nonstrict(uri: str) -> Any:
    """libnbd that sends requests not aligned to the advertised minimum block size."""
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_BOUNDS | nbd.STRICT_ZERO_SIZE)
    h.connect_uri(uri)
    return h


def test_luks_unaligned_reads_match_nbdkit_and_qemu(
    images: dict[str, Path], start_node: StartNode, start_nbdkit: Any, tmp_path: Path
) -> None:
    want = qemu_plain(copy(images, "default", tmp_path / "q"))
    ours = _nonstrict(serve(start_node, images["default"], read_only=True).uri)
    theirs = _nonstrict(nbdkit_luks(start_nbdkit, images["default"], "-r").uri)
    rng = random.Random(5)
    spans = [(rng.randrange(len(want) - 70000), rng.randrange(1, 70000)) for _ in range(40)]
    for offset, length in [*spans, (len(want) - 3, 3), (511, 2), (0, 1)]:
        got = ours.pread(length, offset)
        assert got == want[offset : offset + length], (offset, length)
        assert got == theirs.pread(length, offset), (offset, length)


def test_luks_unaligned_writes_and_zeroes_match_the_model(
    images: dict[str, Path], start_node: StartNode, tmp_path: Path
) -> None:
    """Reads, writes and zeroes at any offset and length (nbdkit 1.32 is no peer here: its
    unaligned writes and zeroes garble the rest of the sectors they touch)."""
    path = copy(images, "default", tmp_path)
    model = bytearray(qemu_plain(copy(images, "default", tmp_path / "q")))
    rng = random.Random(7)
    ops = []
    for _ in range(60):
        offset = rng.randrange(len(model) - 70000)
        length = rng.randrange(1, 70000)
        ops.append((rng.choice("wrz"), offset, length, rng.randbytes(length)))
    # The last bytes, across a sector boundary, inside one sector from its start, and to its end.
    ops += [("w", len(model) - 7, 7, b"the end"), ("w", 1023, 2, b"ab"), ("z", 2047, 1, b""),
            ("w", 4096, 100, b"s" * 100), ("w", 5000, 120, b"e" * 120),
            ("w", 8193, 3, b"one")]  # fmt: skip
    node = serve(start_node, path, control=True)
    h = _nonstrict(node.uri)
    for op, offset, length, data in ops:
        if op == "w":
            h.pwrite(data, offset)
            model[offset : offset + length] = data
        elif op == "z":
            h.zero(length, offset)
            model[offset : offset + length] = bytes(length)
        else:
            assert h.pread(length, offset) == model[offset : offset + length], (offset, length)
    assert h.pread(len(model), 0) == model
    h.flush()
    h.shutdown()
    info = json.loads(run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout)
    assert info["status"]["read_modify_writes"] > 0  # the unaligned ones were patched
    node.stop()
    assert sha(qemu_plain(path)) == sha(bytes(model))


def test_luks_concurrent_writes_into_one_sector_lose_nothing(
    images: dict[str, Path], start_node: StartNode, tmp_path: Path
) -> None:
    """Many small writes in flight at once, side by side inside the same few sectors: each
    is a read-modify-write of a sector another one is patching too."""
    path = copy(images, "default", tmp_path)
    node = serve(start_node, path)
    h = _nonstrict(node.uri)
    rng = random.Random(3)
    expected = bytearray(h.pread(2048, 10 * KiB))
    cookies = []
    for start in range(0, 2048, 64):
        piece = rng.randbytes(64)
        expected[start : start + 64] = piece
        cookies.append(h.aio_pwrite(piece, 10 * KiB + start))
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    assert h.pread(2048, 10 * KiB) == expected
    h.shutdown()
    node.stop()
    assert qemu_plain(path)[10 * KiB : 12 * KiB] == expected


def test_luks_upstream_with_a_larger_minimum_block(
    images: dict[str, Path], start_node: StartNode, tmp_path: Path
) -> None:
    """Over an upstream that takes only 4K-aligned requests (and refuses others), the node
    reads and writes whole 4K blocks and advertises 4K; over one whose blocks do not divide
    the payload offset (2068480, qemu's) it refuses to start, saying what to do."""
    path = copy(images, "default", tmp_path)
    model = bytearray(qemu_plain(copy(images, "default", tmp_path / "q")))
    up = start_node("file", str(path))
    strict = start_node("blocksize-policy", "blocksize-minimum=4K", "blocksize-error-policy=error",
                        upstreams=[up.uri])  # fmt: skip
    node = start_node("luks", f"passphrase={PASS}", upstreams=[strict.uri])
    assert export_info(node.uri)["block_size_minimum"] == 4096
    h = _nonstrict(node.uri)
    h.pwrite(b"x" * 5000, 3000)
    model[3000:8000] = b"x" * 5000
    assert h.pread(10000, 1) == model[1:10001]
    h.shutdown()
    node.stop()
    assert sha(qemu_plain(path)) == sha(bytes(model))
    odd = start_node("blocksize-policy", "blocksize-minimum=64K", "blocksize-preferred=64K",
                     upstreams=[up.uri])  # fmt: skip
    err = failed_start(start_node, f"passphrase={PASS}", upstreams=(odd.uri,))
    assert "payload starts at byte 2068480" in err and "65536" in err and "blocksize" in err


def test_luks_fills_the_upstream_holes_before_decrypting(
    images: dict[str, Path], tmp_path: Path
) -> None:
    """In-process, over a memory backend holding the image's data pages only: a read of a
    hole leaves the buffer as it was, and ciphertext zeros decrypt to what qemu reads there,
    not to what the buffer held."""
    data = images["default"].read_bytes()
    want = qemu_plain(copy(images, "default", tmp_path))
    backend = mem(size=len(data))
    for at in range(0, len(data), 4096):
        if any(data[at : at + 4096]):
            backend.store.write(memoryview(data[at : at + 4096]), at)
    node = Luks(LuksParams(passphrase=PASS), backend)

    async def read() -> bytes:
        await node.start()
        buf = memoryview(bytearray(b"\xee" * len(want)))
        assert await node.pread(buf, 0, 0) is None
        odd = memoryview(bytearray(b"\xee" * 3001))
        await node.pread(odd, 1_000_001, 0)
        assert bytes(odd) == want[1_000_001:1_003_002]
        return bytes(buf)

    assert sha(asyncio.run(read())) == sha(want)


def _prompted(proc: subprocess.Popen[bytes], seen: bytearray) -> bool:
    """Whether the node has asked for its passphrase on stderr (what it said goes to `seen`)."""
    assert proc.stderr is not None
    while select.select([proc.stderr], [], [], 0)[0]:
        piece = os.read(proc.stderr.fileno(), 4096)
        if not piece:
            break
        seen += piece
    return b"LUKS passphrase: " in seen or proc.poll() is not None


@pytest.mark.parametrize("typed", [f"{PASS}\n", "\x04"], ids=["passphrase", "ctrl-d"])
def test_luks_passphrase_asked_on_the_terminal(
    images: dict[str, Path], start_node: StartNode, tmp_path: Path, typed: str
) -> None:
    """passphrase=-: asked for on the terminal on stdin (a pty here), without echo; an end
    of input instead of a passphrase stops the node."""
    up = start_node("file", str(images["default"]), extra=("--read-only",))
    ready = tmp_path / "ready.json"
    main, terminal = pty.openpty()
    cmd = [*NBDFABRIC, "node", "luks", "passphrase=-", "--upstream", up.uri, "--listen",
           f"unix:{tmp_path}/tty.sock", "--ready-file", str(ready)]  # fmt: skip
    # A session of its own: no controlling terminal, so getpass reads the pty on stdin.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=terminal, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    os.close(terminal)
    seen = bytearray()
    try:
        wait_for(lambda: _prompted(proc, seen), 30, "the prompt")
        os.write(main, typed.encode())  # only now: turning echo off drops what came before
        wait_for(lambda: ready.exists() or proc.poll() is not None, 30, "the node")
        if typed == "\x04":
            assert proc.wait() == 1
            _prompted(proc, seen)
            assert b"passphrase=-: nothing was typed (end of input)" in seen
            return
        assert proc.poll() is None, seen
        uri = json.loads(ready.read_text())["uri"]
        assert nbd_connect(uri).pread(512, 0) == b"\x5a" * 512
        echoed = os.read(main, 4096) if select.select([main], [], [], 0.2)[0] else b""
        assert PASS.encode() not in echoed  # echo was off
    finally:
        proc.terminate()
        proc.wait(30)
        os.close(main)
    _prompted(proc, seen)
    assert PASS.encode() not in seen


# Passphrases and key slots ----------------------------------------------------------------------


def test_luks_wrong_passphrase_exits_1_saying_so(
    images: dict[str, Path], start_node: StartNode
) -> None:
    up = start_node("file", str(images["default"]), extra=("--read-only",))
    err = failed_start(start_node, "passphrase=Sesame", upstreams=(up.uri,))
    assert "the passphrase is not correct: no key slot could be unlocked (tried 0)" in err


def test_luks_opens_with_whichever_enabled_slot_the_passphrase_fits(
    images: dict[str, Path], start_node: StartNode, tmp_path: Path
) -> None:
    path = images["slots"]
    want = sha(qemu_plain(copy(images, "slots", tmp_path / "q")))
    for passphrase, slot in ((PASS, 0), (OTHER, 3)):
        node = serve(start_node, path, f"passphrase={passphrase}", read_only=True, control=True)
        assert sha(read_export(node.uri, tmp_path / f"{slot}.raw")) == want
        info = json.loads(run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout)
        assert info["status"]["luks"]["opened_slot"] == slot
        assert info["status"]["luks"]["key_slots"] == [0, 3]
        node.stop()
    up = start_node("file", str(path), extra=("--read-only",))
    err = failed_start(start_node, "passphrase=neither", upstreams=(up.uri,))
    assert "no key slot could be unlocked (tried 0, 3)" in err


def test_luks_passphrase_from_a_file_or_a_descriptor(
    images: dict[str, Path], start_node: StartNode, tmp_path: Path
) -> None:
    """+FILE and -FD give the first line without its newline, as nbdkit reads them."""
    up = start_node("file", str(images["default"]), extra=("--read-only",))
    want = qemu_plain(copy(images, "default", tmp_path / "q"))[:4096]
    pw = tmp_path / "pw"
    pw.write_text(f"{PASS}\nnot this line\n")
    node = start_node("luks", f"passphrase=+{pw}", upstreams=[up.uri])
    assert nbd_connect(node.uri).pread(4096, 0) == want
    read_end, write_end = os.pipe()
    os.write(write_end, PASS.encode())  # no newline: the end of the pipe ends it
    os.close(write_end)
    try:
        node = start_node("luks", f"passphrase=-{read_end}", upstreams=[up.uri],
                          pass_fds=(read_end,))  # fmt: skip
    finally:
        os.close(read_end)
    assert nbd_connect(node.uri).pread(4096, 0) == want
    pw.write_text(f"{PASS}\r\n")  # the \r is part of the passphrase (nbdkit's reading)
    assert "no key slot" in failed_start(start_node, f"passphrase=+{pw}", upstreams=(up.uri,))
    err = failed_start(start_node, f"passphrase=+{tmp_path}/none", upstreams=(up.uri,))
    assert f"passphrase=+{tmp_path}/none: cannot open the file: No such file" in err


def test_luks_passphrase_from_the_terminal_needs_one(
    images: dict[str, Path], start_node: StartNode
) -> None:
    up = start_node("file", str(images["default"]), extra=("--read-only",))
    err = failed_start(start_node, "passphrase=-", upstreams=(up.uri,))
    assert "passphrase=-: stdin is not a terminal" in err


@pytest.mark.parametrize(
    ("words", "said"),
    [
        (["passphrase=+"], "bad value '+' for 'passphrase'"),
        (["passphrase=-x"], "bad value '-x' for 'passphrase' (accepts string): -FD needs a"),
        (["passphrase=-2"], "-FD cannot be stdin, stdout or stderr"),
        (["passphrase=-٣"], "-FD needs a file descriptor number"),
        ([], "parameter 'passphrase' is required"),
        (["password=x"], "unknown parameter 'password'"),
    ],
)
def test_luks_bad_params_exit_1_naming_the_key(tmp_path: Path, words: list[str], said: str) -> None:
    res = subprocess.run(
        [*NBDFABRIC, "node", "luks", *words, "--upstream",
         f"nbd+unix:///?socket={tmp_path}/nobody.sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 1 and said in res.stderr, res.stderr
    assert res.stderr.startswith("nbdfabric node: luks: "), res.stderr


def test_luks_never_shows_the_passphrase(images: dict[str, Path], start_node: StartNode) -> None:
    node = serve(start_node, images["default"], read_only=True, control=True)
    text = run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout
    info = json.loads(text)
    assert {p["name"]: p["value"] for p in info["params"]} == {"passphrase": "***"}
    assert PASS not in text
    luks = info["status"]["luks"]
    assert (luks["cipher"], luks["hash"], luks["key_bits"]) == ("aes-xts-plain64", "sha256", 512)


# Images it cannot open --------------------------------------------------------------------------


def test_luks_refuses_an_upstream_that_is_not_luks(start_node: StartNode) -> None:
    cases = [("memory", "1M", "the upstream is not a LUKS image (it starts with b'\\x00"),
             ("memory", "512", "the upstream is 512 bytes: too small for a LUKS header"),
             ("null", "0", "the upstream is 0 bytes: too small for a LUKS header")]  # fmt: skip
    for kind, size, said in cases:
        up = start_node(kind, size)
        assert said in failed_start(start_node, f"passphrase={PASS}", upstreams=(up.uri,))


def test_luks_refuses_a_cipher_it_does_not_serve(
    images: dict[str, Path], start_node: StartNode, tmp_path: Path
) -> None:
    path = copy(images, "default", tmp_path)
    data = bytearray(path.read_bytes())
    data[8:40] = b"serpent".ljust(32, b"\0")
    path.write_bytes(data)
    up = start_node("file", str(path), extra=("--read-only",))
    err = failed_start(start_node, f"passphrase={PASS}", upstreams=(up.uri,))
    assert "the cipher spec 'serpent-xts-plain64' is not supported: only AES is" in err


def _header(**changes: Any) -> bytes:
    """A LUKSv1 header (aes-xts-plain64, sha256, one slot) with `changes` to its fields."""
    fields = {
        "magic": b"LUKS\xba\xbe", "version": 1, "name": b"aes", "mode": b"xts-plain64",
        "hash": b"sha256", "payload": 4096, "key_bytes": 64, "digest": bytes(20),
        "salt": bytes(32), "iterations": 1000, "uuid": b"u",
    }  # fmt: skip
    fields.update(changes)
    head = HEADER.pack(*fields.values())
    slots = [KEY_SLOT.pack(0x00AC71F3, 1000, bytes(32), 8, 4000)]
    slots += [KEY_SLOT.pack(SLOT_DISABLED, 0, bytes(32), 0, 0)] * 7
    return head + b"".join(slots)


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({}, ""),
        (
            {"version": 2},
            "LUKS version 2 (LUKS2: convert it with `cryptsetup convert --type "
            "luks1`) is not supported: only LUKSv1 is",
        ),
        ({"mode": b"ecb"}, "the cipher spec 'aes-ecb' is not supported"),
        ({"mode": b"ctr-plain64"}, "the cipher spec 'aes-ctr-plain64' is not supported"),
        ({"mode": b"cbc-benbi"}, "the cipher spec 'aes-cbc-benbi' is not supported"),
        ({"mode": b"cbc-essiv"}, "the cipher spec 'aes-cbc-essiv' is not supported"),
        ({"mode": b"cbc-plain:sha1"}, "the cipher spec 'aes-cbc-plain:sha1' is not supported"),
        (
            {"mode": b"cbc-essiv:sha1", "key_bytes": 32},
            "essiv needs a hash whose digest is an AES key",
        ),
        (
            {"mode": b"cbc-essiv:whirlpool", "key_bytes": 32},
            "the LUKS hash 'whirlpool' is not supported",
        ),
        (
            {"key_bytes": 48},
            "'aes-xts-plain64' with a 384-bit key is not supported: xts takes "
            "keys of 256, 512 bits",
        ),
        ({"mode": b"cbc-plain", "key_bytes": 64}, "cbc takes keys of 128, 192, 256 bits"),
        ({"hash": b"ripemd160"}, "the LUKS hash 'ripemd160' is not supported (supported: md5"),
        ({"payload": 1}, "the payload offset 1 overlaps the header"),
        ({"payload": 5000}, "the payload starts at byte 2560000, past the end of the upstream"),
        ({"iterations": 0}, "the master key digest has 0 PBKDF2 iterations"),
    ],
)
def test_luks_header_is_checked_before_any_key_is_tried(changes: dict[str, Any], said: str) -> None:
    size = 4096 * 512
    if not said:
        header = parse_header(_header(), size)
        assert (header.cipher_spec, header.payload_offset, [s.index for s in header.slots]) == (
            "aes-xts-plain64",
            4096 * 512,
            [0],
        )
        return
    with pytest.raises(LuksError) as caught:
        parse_header(_header(**changes), size)
    assert said in str(caught.value)


def test_luks_key_slots_are_checked() -> None:
    head = bytearray(_header())
    at = HEADER.size
    struct.pack_into(">I", head, at, 0x1234)
    with pytest.raises(LuksError, match="key slot 0 is neither enabled nor disabled"):
        parse_header(bytes(head), 4096 * 512)
    struct.pack_into(">I", head, at, SLOT_DISABLED)
    with pytest.raises(LuksError, match="no enabled key slot"):
        parse_header(bytes(head), 4096 * 512)
    head = bytearray(_header())
    struct.pack_into(">I", head, at + 40, 4096)  # key material at sector 4096: past the end
    with pytest.raises(LuksError, match=r"key slot 0's key material \(bytes 2097152 to"):
        parse_header(bytes(head), 4096 * 512)


def test_luks_payload_ending_in_part_of_a_sector_is_cut_to_whole_sectors(
    images: dict[str, Path], start_node: StartNode, tmp_path: Path
) -> None:
    """nbdkit advertises the part (and aborts reading it); qemu rounds up; we leave it out.
    A payload offset at the very end gives an empty export."""
    path = copy(images, "default", tmp_path)
    payload = parse_header(path.read_bytes()[:HEADER_SIZE], path.stat().st_size).payload_offset
    with path.open("r+b") as f:
        f.truncate(payload + MiB + 100)
    node = serve(start_node, path, read_only=True)
    assert export_info(node.uri)["export-size"] == MiB
    with path.open("r+b") as f:
        f.truncate(payload)
    node = serve(start_node, path, read_only=True)
    assert export_info(node.uri)["export-size"] == 0


# Sector encryption, in-process ------------------------------------------------------------------


def test_luks_iv_generators() -> None:
    """plain keeps the sector number's low 32 bits, plain64 all 64; essiv is plain64
    encrypted with AES-ECB under SHA-256 of the key."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    first = (1 << 32) - 1

    def spec(ivgen: str, essiv: str = "") -> CipherSpec:
        return CipherSpec("cbc", ivgen, essiv, 32)

    plain = SectorCipher(spec("plain"), key).ivs(first, 2)
    assert plain == [(2**32 - 1).to_bytes(16, "little"), bytes(16)]
    plain64 = SectorCipher(spec("plain64"), key).ivs(first, 2)
    assert plain64 == [(2**32 - 1).to_bytes(16, "little"), (2**32).to_bytes(16, "little")]
    import hashlib

    essiv_key = hashlib.sha256(key).digest()
    ecb = Cipher(algorithms.AES(essiv_key), modes.ECB()).encryptor()
    want = [ecb.update(iv) for iv in plain64]
    assert SectorCipher(spec("essiv", "sha256"), key).ivs(first, 2) == want


def test_luks_sectors_encrypt_and_decrypt_alone() -> None:
    """Each sector is its own: the same plaintext in two sectors gives different ciphertext,
    and a sector decrypts the same whatever batch it is in."""
    spec = CipherSpec("xts", "plain64", "", 64)
    cipher = SectorCipher(spec, bytes(range(64)))
    plain = bytes(4 * 512)
    out = memoryview(bytearray(len(plain)))
    cipher.encrypt(plain, 10, out)
    sectors = [bytes(out[i : i + 512]) for i in range(0, len(out), 512)]
    assert len(set(sectors)) == 4
    one = memoryview(bytearray(512))
    cipher.decrypt(sectors[2], 12, one)
    assert bytes(one) == bytes(512)
    back = memoryview(bytearray(out))
    cipher.decrypt(back, 10, back)  # in place
    assert bytes(back) == plain
    with pytest.raises(ValueError, match="whole sectors"):
        cipher.decrypt(bytes(100), 0, memoryview(bytearray(100)))
