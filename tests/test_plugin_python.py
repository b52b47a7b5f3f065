"""The `python` plugin with scripts written here for nbdkit's python plugin (a RAM disk as the
example in nbdkit-python-plugin(3), a sparse one with extents, zero and trim, an API 1 one),
through real clients, and beside nbdkit 1.32's python plugin running the very same scripts:
same bytes, capabilities, maps, call arguments and errors.

Where we knowingly differ from nbdkit (see nodes/plugins/python.py): a callback that hangs fails
its request after `script-timeout` (nbdkit waits forever: not compared, but measured here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from conftest import (
    CAPABILITIES,
    NBDFABRIC,
    ROOT,
    Proc,
    capabilities,
    every_request_kind,
    nbd_connect,
    read_all,
    run,
    wait_for,
)

KiB, MiB = 1024, 1024 * 1024

#: A RAM disk, nbdkit-python-plugin(3)'s example ramdisk.py: `size=` sets its size.
RAMDISK = """\
import nbdkit

API_VERSION = 2

disk = bytearray(1024 * 1024)


def config(key, value):
    global disk
    if key == "size":
        disk = bytearray(nbdkit.parse_size(value))
    else:
        raise RuntimeError("unknown parameter: " + key)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    nbdkit.debug("open: readonly=%d" % readonly)
    return 1


def get_size(h):
    return len(disk)


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    end = offset + len(buf)
    buf[:] = disk[offset:end]


def pwrite(h, buf, offset, flags):
    end = offset + len(buf)
    disk[offset:end] = buf


def flush(h, flags):
    pass


def zero(h, count, offset, flags):
    disk[offset:offset + count] = bytearray(count)
"""

#: A sparse RAM disk in 64K blocks: a block never written (or trimmed, or zeroed with
#: may_trim) is a hole, one zeroed whole is allocated zeros; extents say so. FUA native, cache
#: emulated, fast zero, two export names for the one disk (others refused). Thread-safe under
#: the parallel model.
SPARSE = """\
import nbdkit

API_VERSION = 2
BLOCK = 65536
size = 4 * 1024 * 1024
blocks = {}  # block number -> bytearray(BLOCK); absent: a hole
zeroed = set()  # allocated blocks known to be all zeros


def config(key, value):
    global size
    if key == "size":
        size = nbdkit.parse_size(value)
    else:
        raise RuntimeError("unknown parameter: " + key)


def config_complete():
    if size % BLOCK:
        raise RuntimeError("size must be a multiple of 64K")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def list_exports(readonly, is_tls):
    return [("sparse", "a sparse RAM disk"), "other"]


def default_export(readonly, is_tls):
    return "sparse"


def open(readonly):
    name = nbdkit.export_name()
    if name not in ("sparse", "other"):
        raise RuntimeError("no export named " + name)
    return {"export": name}


def export_description(h):
    return "the " + h["export"] + " disk"


def get_size(h):
    return size


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_EMULATE


def can_fast_zero(h):
    return True


def can_multi_conn(h):
    return True


def pieces(count, offset):
    # (block, start in it, end in it) for each block the range touches
    while count > 0:
        n, at = divmod(offset, BLOCK)
        m = min(count, BLOCK - at)
        yield n, at, at + m
        offset += m
        count -= m


def pread(h, buf, offset, flags):
    pos = 0
    for n, lo, hi in pieces(len(buf), offset):
        b = blocks.get(n)
        buf[pos:pos + hi - lo] = b[lo:hi] if b is not None else bytes(hi - lo)
        pos += hi - lo


def pwrite(h, buf, offset, flags):
    pos = 0
    for n, lo, hi in pieces(len(buf), offset):
        b = blocks.setdefault(n, bytearray(BLOCK))
        zeroed.discard(n)
        b[lo:hi] = buf[pos:pos + hi - lo]
        pos += hi - lo


def flush(h, flags):
    pass


def clear(count, offset, may_trim):
    for n, lo, hi in pieces(count, offset):
        if lo == 0 and hi == BLOCK:
            if may_trim:
                blocks.pop(n, None)
                zeroed.discard(n)
            else:
                blocks[n] = bytearray(BLOCK)
                zeroed.add(n)
        else:
            b = blocks.get(n)
            if b is not None:
                b[lo:hi] = bytes(hi - lo)


def trim(h, count, offset, flags):
    clear(count, offset, True)


def zero(h, count, offset, flags):
    clear(count, offset, bool(flags & nbdkit.FLAG_MAY_TRIM))


def extents(h, count, offset, flags):
    out = []
    for n, lo, hi in pieces(count, offset):
        if n not in blocks:
            kind = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
        elif n in zeroed:
            kind = nbdkit.EXTENT_ZERO
        else:
            kind = 0
        out.append((n * BLOCK, BLOCK, kind))
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return out
"""

#: API 1 (no API_VERSION): pread returns the bytes, no flags anywhere.
API1 = """\
import nbdkit

disk = bytearray(4 * 1024 * 1024)


def open(readonly):
    return {}


def get_size(h):
    return len(disk)


def pread(h, count, offset):
    return disk[offset:offset + count]


def pwrite(h, buf, offset):
    disk[offset:offset + len(buf)] = buf


def flush(h):
    pass


def trim(h, count, offset):
    disk[offset:offset + count] = bytearray(count)


def zero(h, count, offset, may_trim):
    disk[offset:offset + count] = bytearray(count)
"""

#: Every callback with its arguments (buffers as their length) on a line of `log=`.
LOGGED = """\
import nbdkit

API_VERSION = 2
log = None


def note(*args):
    with open_log() as f:
        print(*args, file=f)


def open_log():
    import builtins
    return builtins.open(log, "a")


def config(key, value):
    global log
    if key == "log":
        log = value
    else:
        note("config", key, value)


def config_complete():
    note("config_complete")


def get_ready():
    note("get_ready")


def after_fork():
    note("after_fork")


def open(readonly):
    note("open", readonly, nbdkit.export_name())
    return "h"


def get_size(h):
    return 1024 * 1024


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_fast_zero(h):
    return True


def pread(h, buf, offset, flags):
    note("pread", h, len(buf), offset, flags)
    buf[:] = bytes(len(buf))


def pwrite(h, buf, offset, flags):
    note("pwrite", h, type(buf).__name__, buf.readonly, len(buf), offset, flags)


def flush(h, flags):
    note("flush", h, flags)


def trim(h, count, offset, flags):
    note("trim", h, count, offset, flags)


def zero(h, count, offset, flags):
    note("zero", h, count, offset, flags)


def cache(h, count, offset, flags):
    note("cache", h, count, offset, flags)


def extents(h, count, offset, flags):
    note("extents", h, count, offset, flags)
    return [(offset, count, 0)]


def close(h):
    note("close", h)


def cleanup():
    note("cleanup")
"""

#: pread fails in the way its offset / 512 picks; zero asks to be written as zeros.
FAILING = """\
import errno
import nbdkit

API_VERSION = 2
disk = bytearray(b"\\x01" * 1024 * 1024)


def open(readonly):
    return 1


def get_size(h):
    return 1024 * 1024


def pread(h, buf, offset, flags):
    case = offset // 512
    if case == 1:
        nbdkit.set_error(errno.ENOSPC)
        raise RuntimeError("no room")
    if case == 2:
        raise RuntimeError("plain")  # EIO: the errno of the failure before is not kept
    if case == 3:
        nbdkit.set_error(errno.ENOSPC)  # and then succeeds
    if case == 4:
        nbdkit.set_error(errno.EROFS)
        raise Exception
    if case == 5:
        raise OSError(errno.ENOSPC, "an OSError's errno is not set_error's")
    if case == 6:
        nbdkit.set_error(errno.EPERM)
        nbdkit.set_error(errno.EINVAL)
        raise ValueError("the last one counts")
    if case == 7:
        return b"a value pread returns is ignored"
    if case == 8:
        1 / 0
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    if offset >= 512 * 1024:
        nbdkit.set_error(errno.ENOSPC)
        raise RuntimeError("disk full")
    disk[offset:offset + len(buf)] = buf


def zero(h, count, offset, flags):
    nbdkit.set_error(errno.EOPNOTSUPP)  # nbdkit writes zeros instead
    raise RuntimeError("write zeros instead")
"""
#: What the client gets for FAILING's pread cases 0-8.
READ_ERRORS = [None, "ENOSPC", "EIO", None, "EPERM", "EIO", "EINVAL", None, "EIO"]


def write_script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def qemu_io(uri: str, *commands: str) -> None:
    run(["qemu-io", "-f", "raw", "-t", "writeback", uri, *(a for c in commands for a in ("-c", c))])


def errno_name(call: Callable[[], object]) -> str | None:
    try:
        call()
    except nbd.Error as exc:
        return str(exc.errno)
    return None


#: nbdinfo --json's fields that both must agree on (block sizes apart: ours says what the
#: session enforces where nbdkit says nothing).
KEYS = (*CAPABILITIES, "is_rotational")

WORKLOAD = (
    "write -P 0xab 0 1M",
    "write -f -P 0xcd 1536K 4K",  # FUA
    "write -z 2M 64K",
    "write -z -u 2176K 128K",  # may trim
    "write -P 0x22 2200K 8K",
    "discard 3M 128K",
    "write -P 0x33 3M 100K",
    "discard 3136K 64K",
    "aio_write -P 0x11 1100K 8K",
    "aio_flush",
    "read -P 0xab 0 1M",
    "read -P 0xcd 1536K 4K",
    "read -P 0 2M 64K",
    "read -P 0x11 1100K 8K",
)


def both(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], *args: str
) -> tuple[Proc, Proc]:
    return start_node("python", *args), start_nbdkit("python", *args)


# -- the same script through both ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "size"),
    [(RAMDISK, "4M"), (SPARSE, "4M"), (API1, "")],
    ids=["ramdisk", "sparse", "api1"],
)
def test_python_same_bytes_and_capabilities_as_nbdkit(
    script: str,
    size: str,
    start_node: Callable[..., Proc],
    start_nbdkit: Callable[..., Proc],
    tmp_path: Path,
):
    path = write_script(tmp_path, "disk.py", script)
    ours, theirs = both(start_node, start_nbdkit, path, *([f"size={size}"] if size else []))
    assert capabilities(ours.uri, KEYS) == capabilities(theirs.uri, KEYS)
    for uri in (ours.uri, theirs.uri):
        qemu_io(uri, *WORKLOAD)
        h = nbd_connect(uri)
        h.pwrite(b"\x5a" * 4096, 8192, nbd.CMD_FLAG_FUA)
        if h.can_cache():
            h.cache(64 * KiB, 0)
        h.flush()
        h.shutdown()
    assert digest(read_all(ours.uri)) == digest(read_all(theirs.uri))
    other = tmp_path / "other.img"
    other.write_bytes(bytes(range(256)) * (len(read_all(ours.uri)) // 256))
    for uri in (ours.uri, theirs.uri):
        run(["nbdcopy", "--flush", str(other), uri])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(other), uri])


def test_python_sparse_map_and_exports_as_nbdkit(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    path = write_script(tmp_path, "sparse.py", SPARSE)
    ours, theirs = both(start_node, start_nbdkit, path, "size=4M")
    maps = {}
    for name, uri in (("ours", ours.uri), ("nbdkit", theirs.uri)):
        qemu_io(uri, *WORKLOAD)
        maps[name] = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
        listed = json.loads(run(["nbdinfo", "--list", "--json", uri]).stdout)["exports"]
        assert [(e["export-name"], e.get("description")) for e in listed] == [
            ("sparse", "a sparse RAM disk"),
            ("other", None),
        ]
        h = nbd.NBD()
        h.set_full_info(True)
        h.connect_uri(uri)  # "": default_export's
        assert h.get_canonical_export_name() == "sparse"
        assert h.get_export_description() == "the sparse disk"
        h.shutdown()
    assert maps["ours"] == maps["nbdkit"]
    types = {(e["offset"], e["type"]) for e in maps["ours"]}
    # written data, zeroed without trim (allocated zeros), holes that read as zeros
    assert (0, 0) in types and (2 * MiB, 2) in types and (3 * MiB + 64 * KiB, 3) in types, types
    seen: dict[str, list[list[int]]] = {}
    for name, uri in (("ours", ours.uri), ("nbdkit", theirs.uri)):
        h = nbd_connect(uri)
        got: list[list[int]] = seen.setdefault(name, [])

        def note(ctx: str, off: int, ents: list[int], err: int, got: list = got) -> None:
            got.append(list(ents))

        h.block_status(64 * KiB, 4096, note, nbd.CMD_FLAG_REQ_ONE)
        h.block_status(200 * KiB, 2 * MiB - 4096, note)
        h.shutdown()
    assert seen["ours"][0][:2] == seen["nbdkit"][0][:2]  # one extent, of the same type
    assert seen["ours"][1][1::2] == seen["nbdkit"][1][1::2]  # the same types in order


def test_python_callbacks_get_nbdkits_arguments(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    path = write_script(tmp_path, "logged.py", LOGGED)
    calls = {}
    for name, start in (("ours", start_node), ("nbdkit", start_nbdkit)):
        log = tmp_path / f"{name}.log"
        node = start("python", path, f"log={log}", "a=1", "a=3", "b.c=two words", "x-y=")
        h = nbd_connect(node.uri)
        h.pread(512, 1024)
        every_request_kind(h)
        h.shutdown()
        # The server runs close once it has seen the disconnection; a stop signal before
        # that may skip it (nbdkit does, under load): wait for it on both.
        wait_for(lambda log=log: "close h" in log.read_text().splitlines(), what=f"{name}: close")
        node.stop()
        calls[name] = log.read_text().splitlines()
    assert calls["ours"] == calls["nbdkit"]
    assert calls["ours"][:9] == [
        "config a 1",  # in the order given, each time given
        "config a 3",
        "config b.c two words",
        "config x-y ",
        "config_complete",
        "get_ready",
        "after_fork",
        "open False ",
        "pread h 512 1024 0",
    ]
    assert calls["ours"][9:11] == [
        "pwrite h memoryview True 512 512 0",
        "pwrite h memoryview True 512 1024 2",
    ]
    assert calls["ours"][-2:] == ["close h", "cleanup"]


def failures(h: nbd.NBD) -> list[str | None]:
    """FAILING's errors through handle `h` (shut down after)."""
    errors = [errno_name(lambda i=i: h.pread(512, i * 512)) for i in range(9)]
    errors.append(errno_name(lambda: h.pwrite(b"y" * 512, 512 * KiB)))
    h.pwrite(b"y" * 4096, 8192)
    h.zero(4096, 8192)  # EOPNOTSUPP: written as zeros with pwrite
    errors.append(None if h.pread(4096, 8192) == bytes(4096) else "not zeroed")
    h.shutdown()
    return errors


def test_python_api1_fua_is_a_flush_after(start_node: Callable[..., Proc], tmp_path: Path):
    """API 1's callbacks take no flags: a FUA write or trim is followed by a flush, even where
    can_fua says native (nbdkit 1.32 advertises FUA then and drops it: a known difference)."""
    log = tmp_path / "calls.log"
    text = (
        API1.replace("    pass\n", "    note('flush')\n", 1)
        + f"""

def note(*args):
    import builtins
    with builtins.open({str(log)!r}, "a") as f:
        print(*args, file=f)


def can_fua(h):
    return nbdkit.FUA_NATIVE
"""
    )
    node = start_node("python", write_script(tmp_path, "v1.py", text))
    h = nbd_connect(node.uri)
    assert h.can_fua()
    h.pwrite(b"x" * 512, 0)
    assert not log.exists()
    h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA)
    h.trim(512, 0, nbd.CMD_FLAG_FUA)
    h.shutdown()
    assert log.read_text().splitlines() == ["flush", "flush"]


def test_python_errors_reach_the_client_as_nbdkit_gives_them(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    path = write_script(tmp_path, "fail.py", FAILING)
    ours, theirs = both(start_node, start_nbdkit, path)
    got = {}
    for name, uri in (("ours", ours.uri), ("nbdkit", theirs.uri)):
        got[name] = failures(nbd_connect(uri))
    assert got["ours"] == got["nbdkit"] == [*READ_ERRORS, "ENOSPC", None]
    log = ours.stderr()
    assert "RuntimeError: no room" in log and "ZeroDivisionError" in log
    assert f'File "{path}", line' in log  # where in the script, as nbdkit logs it


#: A read-only disk of zeros to which config adds callbacks: `have=pwrite,flush` defines
#: those (doing nothing), `can_zero=False` a can_zero returning that.
CAPS = """\
API_VERSION = 2


def config(key, value):
    if key == "have":
        for name in value.split(","):
            globals()[name] = lambda *args: None
    else:
        globals()[key] = lambda h: eval(value)


def open(readonly):
    return 1


def get_size(h):
    return 1024 * 1024


def pread(h, buf, offset, flags):
    buf[:] = bytes(len(buf))
"""
CAPS_VARIANTS = [
    [],
    ["have=pwrite"],
    ["have=pwrite,flush"],
    ["have=pwrite,zero"],
    ["have=pwrite,zero,trim,cache,extents"],
    ["have=pwrite", "can_zero=False"],
    ["have=pwrite", "can_zero=True"],
    ["have=pwrite", "can_fast_zero=True"],
    ["have=pwrite", "can_zero=False", "can_fast_zero=False"],
    ["can_write=True"],
    ["have=pwrite", "can_write=0"],
    ["have=pwrite,flush", "can_fua=0"],
    ["have=pwrite", "can_fua=2"],
    ["have=pwrite", "can_flush=True"],
    ["can_cache=1"],
    ["have=cache"],
    ["can_multi_conn=True", "is_rotational=True", "can_trim=True"],
    ["can_multi_conn=1", "is_rotational=2"],  # only True is true (nbdkit 1.32)
    ["have=pwrite,trim,flush", "can_trim=1", "can_flush=None"],
]


def test_python_missing_callbacks_give_nbdkits_defaults(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    path = write_script(tmp_path, "caps.py", CAPS)
    for words in CAPS_VARIANTS:
        ours, theirs = both(start_node, start_nbdkit, path, *words)
        assert capabilities(ours.uri, KEYS) == capabilities(theirs.uri, KEYS), words
        ours.stop(), theirs.stop()


# -- start-up failures --------------------------------------------------------------------------

BAD_SCRIPTS = [
    ("syntax", "API_VERSION = 2\ndef open(readonly:\n    return 1\n", [], "SyntaxError"),
    (
        "no-pread",
        "API_VERSION = 2\ndef open(readonly):\n    return 1\ndef get_size(h):\n    return 1\n",
        [],
        "defines no pread",
    ),
    ("raises", "import nbdkit\nraise RuntimeError('refused at load')\n", [], "refused at load"),
    ("import", "import no_such_module_here\n", [], "ModuleNotFoundError"),
    (
        "config",
        "def config(k, v):\n    raise ValueError('bad key ' + k)\n"
        "def open(r):\n    return 1\ndef get_size(h):\n    return 1\n"
        "def pread(h, c, o):\n    return b''\n",
        ["wrong=1"],
        "bad key wrong",
    ),
    (
        "no-config",
        "def open(r):\n    return 1\ndef get_size(h):\n    return 1\n"
        "def pread(h, c, o):\n    return b''\n",
        ["k=v"],
        "no config function",
    ),
    (
        "api3",
        "API_VERSION = 3\ndef open(r):\n    return 1\ndef get_size(h):\n    return 1\n"
        "def pread(h, b, o, f):\n    pass\n",
        [],
        "unknown version: 3",
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "words", "frag"), BAD_SCRIPTS, ids=[c[0] for c in BAD_SCRIPTS]
)
def test_python_bad_scripts_exit_1_saying_why(
    name: str, text: str, words: list[str], frag: str, tmp_path: Path
):
    path = write_script(tmp_path, f"{name}.py", text)
    sock = tmp_path / "n.sock"
    res = subprocess.run(
        [*NBDFABRIC, "node", "python", path, *words, "--listen", f"unix:{sock}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stderr
    assert frag in res.stderr and path in res.stderr, res.stderr
    assert "nodes/" not in res.stderr, res.stderr  # the script's frames, none of ours
    assert not sock.exists()
    theirs = subprocess.run(
        ["nbdkit", "-f", "-U", str(tmp_path / "k.sock"), "python", path, *words, "--run", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert theirs.returncode == 1, theirs.stderr


def test_python_missing_script_and_stray_words(tmp_path: Path):
    res = subprocess.run(
        [*NBDFABRIC, "node", "python", str(tmp_path / "none.py"), "--listen", f"unix:{tmp_path}/s"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "none.py: No such file or directory" in res.stderr, res.stderr
    res = subprocess.run(
        [*NBDFABRIC, "node", "python", "a.py", "stray", "--listen", f"unix:{tmp_path}/s"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "'script' given twice" in res.stderr, res.stderr


# -- threads, time limits, shutdown -------------------------------------------------------------

#: pread at offset 0 makes the file `entered=` names, then waits until the file `release=`
#: names appears; `model=` the thread model.
BLOCKING = """\
import os
import time
import nbdkit

API_VERSION = 2
builtins_open = open
release = entered = None
model = nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def config(key, value):
    global release, entered, model
    if key == "release":
        release = value
    elif key == "entered":
        entered = value
    elif key == "model":
        model = getattr(nbdkit, "THREAD_MODEL_" + value.upper())


def thread_model():
    return model


def open(readonly):
    return 1


def get_size(h):
    return 1024 * 1024


def pread(h, buf, offset, flags):
    if offset == 0:
        builtins_open(entered, "w").close()
    while offset == 0 and not os.path.exists(release):
        time.sleep(0.01)
    buf[:] = b"\\x07" * len(buf)
"""


@pytest.mark.parametrize("model", ["serialize_all_requests", "parallel"])
def test_python_a_hung_callback_fails_late_not_forever(
    model: str, start_node: Callable[..., Proc], tmp_path: Path
):
    """Client A's read hangs in the script. Its request fails after script-timeout, and so,
    under serialize_all_requests, does client B's, which waits for the turn A's callback
    keeps (parallel: B is served at once). Once the callback returns, both are served."""
    release, entered = tmp_path / "release", tmp_path / "entered"
    path = write_script(tmp_path, "block.py", BLOCKING)
    node = start_node(
        "python", path, f"release={release}", f"entered={entered}", f"model={model}",
        "script-timeout=1s",
    )  # fmt: skip
    a, b = nbd_connect(node.uri), nbd_connect(node.uri)
    got: dict[str, str | None] = {}

    def read(name: str, h: nbd.NBD, offset: int) -> threading.Thread:
        def go() -> None:
            got[name] = errno_name(lambda: h.pread(512, offset))
            got[f"{name} after"] = f"{time.monotonic() - started:.2f} s"

        thread = threading.Thread(target=go)
        thread.start()
        return thread

    started = time.monotonic()
    reading = [read("A", a, 0)]
    wait_for(entered.exists, 10, "A's read to reach the script")
    started = time.monotonic()
    reading.append(read("B", b, 4096))
    for thread in reading:
        thread.join(30)
    release.touch()  # (before asserting: a failure must not leave the script hung)
    assert not any(t.is_alive() for t in reading), f"a read still waits: {got}"
    assert got["A"] == "EIO", got
    assert got["B"] == ("EIO" if model == "serialize_all_requests" else None), got
    wait_for(lambda: "the overdue callback has returned" in node.stderr(), 30, "the return")
    assert a.pread(512, 0) == b"\x07" * 512 and b.pread(512, 4096) == b"\x07" * 512
    a.shutdown(), b.shutdown()
    assert "no answer within 1s" in node.stderr()
    waited = got["B after"]
    print(f"{model}: B's read answered after {waited} while A's callback hung")


def test_python_shutdown_from_a_callback_stops_the_node(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    text = RAMDISK.replace(
        "def flush(h, flags):\n    pass", "def flush(h, flags):\n    nbdkit.shutdown()"
    )
    path = write_script(tmp_path, "stop.py", text)
    for node in both(start_node, start_nbdkit, path, "size=1M"):
        h = nbd_connect(node.uri)
        h.flush()
        with contextlib.suppress(nbd.Error):  # ours may have hung up already
            h.shutdown()  # (nbdkit waits for its clients to leave)
        node.proc.wait(30)
        assert node.proc.returncode == 0


def test_python_read_only_and_nbdkit_module(start_node: Callable[..., Proc], tmp_path: Path):
    log = tmp_path / "calls.log"
    text = f"""\
import nbdkit

API_VERSION = 2


def note(*args):
    with open_({str(log)!r}, "a") as f:
        print(*args, file=f)


open_ = open


def preconnect(readonly):
    note("preconnect", readonly)
    try:
        nbdkit.export_name()
    except RuntimeError as exc:
        note("no export yet:", exc)


def open(readonly):
    note("open", readonly, nbdkit.export_name(), nbdkit.is_tls())
    note("sizes", nbdkit.parse_size("1M"), nbdkit.parse_bool("on"))
    return 1


def get_size(h):
    return 1024 * 1024


def can_write(h):
    note("can_write")
    return True


def pread(h, buf, offset, flags):
    buf[:] = bytes(len(buf))
"""
    path = write_script(tmp_path, "ro.py", text)
    node = start_node("python", path, extra=("--read-only",))
    assert capabilities(node.uri)["is_read_only"]
    calls = log.read_text().splitlines()
    assert calls[:4] == [
        "preconnect True",
        "no export yet: nbdkit.export_name failed",
        "open True  False",
        "sizes 1048576 True",
    ]
    assert "can_write" not in calls  # not asked of a read-only export


def test_python_runs_nbdkits_python_example_unchanged(
    start_node: Callable[..., Proc], tmp_path: Path
):
    """The RAM disk through nbdcopy both ways and qemu-img, as any client uses it."""
    path = write_script(tmp_path, "ramdisk.py", RAMDISK)
    node = start_node("python", path, "size=8M")
    image = tmp_path / "in.img"
    image.write_bytes(bytes(range(256)) * (8 * MiB // 256))
    run(["nbdcopy", "-C", "4", str(image), node.uri])
    out = tmp_path / "out.img"
    run(["nbdcopy", node.uri, str(out)])
    assert digest(out.read_bytes()) == digest(image.read_bytes())
    info = json.loads(run(["qemu-img", "info", "--output=json", node.uri]).stdout)
    assert info["virtual-size"] == 8 * MiB
