"""In-process harness for fan tests, and tests of what the fans share.

Members are real backends (Memory) wrapped in `Flaky`, which the test can fail, restore or wipe
(a member node restarted empty) to simulate losing an upstream. The fan and every member are
served by real `NodeRuntime`s on unix sockets under tmp_path in one event loop running in a
thread, so real clients (libnbd, qemu-io, qemu-img, nbdinfo) drive the fan and read each member
directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import random
import subprocess
import threading
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, mem, nbd_connect, run, wait_for

from nodes.base import Backend, Capabilities, Extents, Holes, Support, read_flat
from nodes.fans._bitmap import BitmapFile, DirtyMap
from nodes.fans._common import combine_caps, to_each
from nodes.plugins.memory import Memory, MemoryParams, SparseStore
from nodes.server.addresses import export_identity, parse_address, repeated_export
from nodes.server.node import NodeOptions, NodeRuntime


class Flaky(Backend):
    """A member that can be lost and restored: while down every request fails with EIO at
    once and `healthy()` is False, and coming back counts a reconnect (what nodes/upstream.py
    promises for a lost upstream)."""

    kind = "flaky"

    def __init__(self, inner: Memory) -> None:
        super().__init__(inner.params)
        self.inner = inner
        self._down = False
        #: links reopened, as nodes/upstream.py counts them: a member node that restarted
        #: (perhaps empty) is always a new connection, which is how the fans learn of it
        self.reconnects = 0
        self.fail_reads = False
        self.read_delay = 0.0  #: seconds each read takes (widens race windows)
        self.bytes_in = 0  #: bytes written or zeroed into it (rebuild accounting)

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()

    def healthy(self) -> bool:
        return not self.down

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        if self._down and not value:
            self.reconnects += 1
        self._down = value

    def wipe(self) -> None:
        """The member's node restarted empty."""
        self.inner.store = SparseStore()

    async def _check(self) -> None:
        await asyncio.sleep(0)  # let requests interleave as over a socket
        if self.down:
            raise OSError(errno.EIO, "member lost")

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        await self._check()
        if self.fail_reads:
            raise OSError(errno.EIO, "injected read error")
        if self.read_delay:
            await asyncio.sleep(self.read_delay)
        return await self.inner.pread(buf, offset, flags)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._check()
        self.bytes_in += len(buf)
        await self.inner.pwrite(buf, offset, flags)

    async def flush(self, flags: int) -> None:
        await self._check()

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self._check()
        await self.inner.trim(count, offset, flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._check()
        self.bytes_in += count
        await self.inner.zero(count, offset, flags)

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await self._check()

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        await self._check()
        return await self.inner.extents(count, offset, flags)


class Shaped(Flaky):
    """A member whose capabilities differ from its memory's (read-only, a block size, ...)."""

    def __init__(self, inner: Memory, **caps: Any) -> None:
        super().__init__(inner)
        self.caps = caps

    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.inner.capabilities(), **self.caps)


class SlowFor(Flaky):
    """A member that takes its time over writes of one byte value (members are not in step)."""

    def __init__(self, inner: Memory, slow: int) -> None:
        super().__init__(inner)
        self.slow = slow

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if buf[0] == self.slow:
            await asyncio.sleep(0.05)
        await super().pwrite(buf, offset, flags)


class Stalled(Flaky):
    """A member whose writes wait while `hold`, then fail if `drop` (they never land)."""

    hold = False
    drop = False

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        while self.hold:  # noqa: ASYNC110 (set from the test thread)
            await asyncio.sleep(0.005)
        if self.drop:
            raise OSError(errno.EIO, "dropped")
        await super().pwrite(buf, offset, flags)


class Harness:
    """One event loop in a thread serving backends on unix sockets."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runtimes: list[NodeRuntime] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self._n = 0

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a plain function in the loop thread (fan state is not thread-safe)."""

        async def go() -> Any:
            return fn(*args)

        return self.run(go())

    def memory(self, size: int) -> tuple[Memory, str]:
        mem = Memory(MemoryParams(size=size))
        return mem, self.serve(mem, "mem")

    def flaky_members(self, n: int, size: int) -> tuple[list[Flaky], list[str]]:
        """n memory members, each served directly (for checks) and wrapped for the fan."""
        flakies, uris = [], []
        for _ in range(n):
            mem, uri = self.memory(size)
            flakies.append(Flaky(mem))
            uris.append(uri)
        return flakies, uris

    def serve(self, backend: Backend, name: str = "node", **options: Any) -> str:
        self._n += 1
        path = self.tmp_path / f"{name}{self._n}.sock"
        if hasattr(backend, "emit"):

            def record(kind: str, message: str, **detail: Any) -> None:
                self.events.append((kind, message, detail))

            backend.emit = record

        async def go() -> NodeRuntime:
            rt = NodeRuntime(backend, NodeOptions(shutdown_grace=5, **options))
            await rt.start(listen=[parse_address(f"unix:{path}")])
            return rt

        self.runtimes.append(self.run(go()))
        return f"nbd+unix:///?socket={path}"

    def stop(self, uri_index: int = -1) -> None:
        rt = self.runtimes.pop(uri_index)
        self.run(rt.shutdown())

    def close(self) -> None:
        for rt in reversed(self.runtimes):
            try:
                self.run(rt.shutdown(), timeout=60)
            except Exception as exc:
                print("shutdown failed:", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def digest(uri: str, size: int, step: int = 1 << 20) -> str:
    """sha256 of a whole export read through libnbd."""
    h = nbd_connect(uri)
    try:
        m = hashlib.sha256()
        for off in range(0, size, step):
            m.update(h.pread(min(step, size - off), off))
        return m.hexdigest()
    finally:
        h.shutdown()


def qemu_compare(a: str, b: str) -> None:
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b])


def sparse_image(path: Path) -> Path:
    """An 8 MiB raw image, mostly holes, with random data in three places (the last 512
    bytes among them): what `qemu-img convert -n` zeroes around."""
    with path.open("wb") as f:
        f.truncate(8 << 20)
        for off, n in [(3 << 10, 100_000), (5 << 20, 65536), ((8 << 20) - 512, 512)]:
            f.seek(off)
            f.write(random.Random(off).randbytes(n))
    return path


def wait_state(h: Harness, fan: Any, index: int, state: str, timeout: float = 120) -> None:
    def check() -> bool:
        return bool(h.call(lambda: fan.slots[index].state) == state)

    wait_for(check, timeout, f"member {index} to become {state}")


def assert_reads_fail(uri: str) -> None:
    """A read through the fan at `uri` fails with EIO."""
    h = nbd_connect(uri)
    try:
        with pytest.raises(nbd.Error, match=r"EIO|Input/output"):
            h.pread(4096, 0)
    finally:
        h.shutdown()


def lose_every_member(h: Harness, fan: Any, flakies: list[Flaky], uri: str) -> None:
    """Every member lost at once: the fan fails and so do its reads."""
    for f in flakies:
        f.down = True
    wait_for(lambda: not h.call(fan.healthy), 10, "the fan to fail")
    assert_reads_fail(uri)


# Tests of the shared parts ----------------------------------------------------------------------


def test_fan_combine_caps_takes_what_every_member_has() -> None:
    a = Capabilities(size=1 << 20, writable=True, flush=True, fua=Support.NATIVE, trim=True,
                     zero=Support.NATIVE, fast_zero=True, multi_conn=True, extents=True,
                     block_min=512, block_preferred=4096, block_max=1 << 25)  # fmt: skip
    b = Capabilities(size=1 << 20, writable=True, flush=True, fua=Support.EMULATE, trim=False,
                     zero=Support.NATIVE, fast_zero=False, multi_conn=False, extents=True,
                     block_min=4096, block_preferred=65536, block_max=1 << 24)  # fmt: skip
    c = combine_caps([a, b], 123)
    assert c.size == 123 and c.writable and c.flush
    assert c.fua is Support.EMULATE
    assert not c.trim and not c.fast_zero and not c.multi_conn
    assert (c.block_min, c.block_preferred, c.block_max) == (4096, 65536, 1 << 24)
    ro = combine_caps([a, Capabilities(size=1 << 20, writable=False)], 1)
    assert not ro.writable and ro.zero is Support.NONE and ro.fua is Support.NONE


def test_fan_combine_caps_rejects_disjoint_block_sizes() -> None:
    a = Capabilities(size=1, writable=True, block_min=65536, block_max=65536)
    b = Capabilities(size=1, writable=True, block_min=512, block_max=4096)
    with pytest.raises(ValueError, match="block sizes"):
        combine_caps([a, b], 1)


def copying_fan(kind: str, members: list[Backend]) -> Backend:
    """A fan of KIND (one that keeps copies of the data, or parity) over MEMBERS."""
    from nodes.fans.mirror import Mirror, MirrorParams
    from nodes.fans.parity import Parity, ParityParams
    from nodes.fans.quorum import Quorum, QuorumParams
    from nodes.fans.verify import Verify, VerifyParams

    fans: dict[str, Callable[[], Backend]] = {
        "mirror": lambda: Mirror(MirrorParams(), members),
        "parity": lambda: Parity(ParityParams.model_validate({"chunk-size": "16K"}), members),
        "quorum": lambda: Quorum(QuorumParams(), members),
        "verify": lambda: Verify(VerifyParams(), members),
    }
    return fans[kind]()


@pytest.mark.parametrize("kind", ["mirror", "parity", "quorum", "verify"])
def test_fan_offers_fast_zero_only_where_every_member_zeroes_fast(
    harness: Harness, kind: str
) -> None:
    """`nbdinfo --can fast-zero` says yes only while every member zeroes natively and offers
    fast zero."""
    n = 3 if kind in ("parity", "quorum") else 2
    for last, offered in [({}, True), ({"fast_zero": False}, False),
                          ({"zero": Support.EMULATE}, False)]:  # fmt: skip
        members: list[Backend] = [Flaky(harness.memory(1 << 20)[0]) for _ in range(n - 1)]
        members.append(Shaped(harness.memory(1 << 20)[0], **last))
        uri = harness.serve(copying_fan(kind, members), kind)
        answer = run(["nbdinfo", "--can", "fast-zero", uri], check=False).returncode
        assert answer == (0 if offered else 2), last


@pytest.mark.parametrize("kind", ["mirror", "parity", "quorum", "verify"])
def test_fan_new_member_needs_trim_only_where_the_array_passes_trims_on(
    harness: Harness, kind: str
) -> None:
    """A member that joins later (`start_replacement`, as `ctl replace` and a late member do)
    over an array that offers trim and fast zero needs its own trim only where the array's trim
    is the members' trims (mirror); where the array trims by zeroing, not even a native zero.
    Fast zero is never asked of it: the array then refuses fast zeros before sending any (and
    trims by zeroing do nothing), rather than stay without the member."""
    n = 3 if kind in ("parity", "quorum") else 2
    fan = copying_fan(kind, [Flaky(harness.memory(1 << 20)[0]) for _ in range(n)])
    uri = harness.serve(fan, kind)
    assert run(["nbdinfo", "--can", "trim", uri], check=False).returncode == 0
    assert run(["nbdinfo", "--can", "fast-zero", uri], check=False).returncode == 0
    by_zeroing = kind != "mirror"
    for shape, why in [
        ({}, None),
        ({"fast_zero": False}, None),
        ({"trim": False}, None if by_zeroing else "it cannot trim"),
        ({"zero": Support.EMULATE, "fast_zero": False}, None),
        ({"zero": Support.EMULATE, "fast_zero": False, "trim": False},
         None if by_zeroing else "it cannot trim"),
    ]:  # fmt: skip
        new = Shaped(harness.memory(1 << 20)[0], **shape)
        if why is None:
            harness.run(fan.start_replacement(1, new))
        else:
            with pytest.raises(ValueError, match=f"cannot use .* as member 1: {why}$"):
                harness.run(fan.start_replacement(1, new))


def test_fan_fast_zero_is_sent_only_if_every_member_zeroes_fast() -> None:
    """`to_each` refuses a fast zero (ENOTSUP) before any member gets it when one of them
    cannot zero fast: the others would zero, and that one then not."""
    members = [mem(b"\1" * 4096) for _ in range(2)]
    caps = [members[0].capabilities(),
            dataclasses.replace(members[1].capabilities(), fast_zero=False)]  # fmt: skip
    calls = [partial(m.zero, 4096, 0) for m in members]

    def held() -> list[bytes]:
        bufs = [bytearray(4096) for _ in members]
        for m, buf in zip(members, bufs, strict=True):
            asyncio.run(read_flat(m, memoryview(buf), 0))
        return [bytes(buf) for buf in bufs]

    with pytest.raises(OSError) as refused:
        asyncio.run(to_each(calls, caps, nbd.CMD_FLAG_FAST_ZERO))
    assert refused.value.errno == errno.ENOTSUP
    assert held() == [b"\1" * 4096] * 2
    assert asyncio.run(to_each(calls, caps, 0)) == ([None, None], False)
    assert held() == [bytes(4096)] * 2


def test_bitmap_file_never_puts_an_older_state_over_a_newer_one(tmp_path: Path) -> None:
    """A fan saves from its loop and from worker threads (the marks a write makes, off the
    loop), and they may finish in any order: the file ends with the newest state taken."""
    import json

    path = tmp_path / "bitmap.json"
    f = BitmapFile(str(path))
    f.save({"n": 2}, 2)
    f.save({"n": 1}, 1)  # taken before, finished after
    assert json.loads(path.read_text()) == {"n": 2}
    f.save({"n": 0})  # generation 0: always written
    assert json.loads(path.read_text()) == {"n": 0}
    saves = list(range(3, 60))
    random.shuffle(saves)
    failed: list[BaseException] = []

    def save(n: int) -> None:
        try:
            f.save({"n": n}, n)
        except BaseException as exc:  # (two saves at once share the temporary file)
            failed.append(exc)

    threads = [threading.Thread(target=save, args=(n,)) for n in saves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == []
    assert json.loads(path.read_text()) == {"n": 59}
    assert [p.name for p in tmp_path.iterdir()] == ["bitmap.json"]  # no temporary file left


def test_fan_dirty_map_counts_runs_and_cursor() -> None:
    d = DirtyMap(100)
    assert d.mark(3, 5) and not d.mark(4, 5)
    d.mark(50, 50)
    assert d.count() == 4
    assert list(d.runs(2)) == [(3, 4), (5, 5), (50, 50)]
    d.discard(3, 5)
    assert d.count() == 1
    d.mark_from(90)
    d.mark(95, 99)
    assert d.count() == 11
    d.discard(90, 94)
    assert d.full_from == 95 and d.count() == 6
    saved = d.to_json()
    e = DirtyMap(100)
    e.load_json(saved)
    assert e.count() == 6 and e.is_dirty(50) and e.is_dirty(99) and not e.is_dirty(94)
    e.mark_all()
    assert e.is_full() and e.count() == 100


# One export as two members -----------------------------------------------------------------------


SAME_EXPORT = [
    ("nbd+unix:///?socket=./m.sock", "nbd+unix:///?socket=/srv/m.sock"),
    ("nbd+unix:///?socket=m.sock", "nbd+unix:///?socket=/srv/m.sock"),
    ("nbd+unix:///?socket=../srv/./m.sock", "nbd+unix:///?socket=//srv/m.sock"),
    ("nbd+unix:///?socket=%2Fsrv%2Fm.sock", "nbd+unix:///?socket=/srv/m.sock"),
    ("nbds+unix:///disk?socket=/srv/m.sock&tls-certificates=/c", "nbd+unix:///disk?socket=/srv/m.sock"),
    ("nbd+unix:///?socket=/x&socket=/srv/m.sock", "nbd+unix:///?socket=/srv/m.sock"),  # last wins
    ("nbd+unix:///a%20b?socket=/srv/m.sock", "nbd+unix:///a b?socket=/srv/m.sock"),
    ("nbd://localhost:10809/x", "nbd://localhost/x"),
    ("nbd://LocalHost/x", "nbds://localhost:10809/x"),
    ("nbd:///x", "nbd://localhost:10809/x"),  # libnbd's default host
    ("nbd://user@host:10809/x#frag", "nbd://host/x"),
    ("nbd://[::1]:10809/", "nbd://[0:0::1]"),
    ("nbd+vsock:///x", "nbd+vsock://2:10809/x"),
]  # fmt: skip

DIFFERENT_EXPORTS = [
    ("nbd+unix:///a?socket=/srv/m.sock", "nbd+unix:///b?socket=/srv/m.sock"),
    ("nbd+unix:///?socket=/srv/m.sock", "nbd+unix:///?socket=/srv/n.sock"),
    ("nbd+unix:///?socket=m.sock", "nbd+unix:///?socket=/srv/m.sock"),  # from /srv/sub
    # Behind a name that may be a symlink, ".." is not ours to take away.
    ("nbd+unix:///?socket=/srv/link/../m.sock", "nbd+unix:///?socket=/srv/m.sock"),
    ("nbd+unix:///a+b?socket=/srv/m.sock", "nbd+unix:///a b?socket=/srv/m.sock"),
    ("nbd://localhost:10810/x", "nbd://localhost/x"),
    ("nbd://127.0.0.1/x", "nbd://localhost/x"),  # one host, maybe: the text cannot tell
    ("nbd://host/x", "nbd+unix:///x?socket=/srv/m.sock"),
    ("nbd+ssh://host/x", "nbd+ssh://host:22/x"),  # not read here: only the same text is one
]


@pytest.mark.parametrize(("one", "other"), SAME_EXPORT)
def test_fan_export_identity_sees_one_export_spelled_two_ways(one: str, other: str) -> None:
    assert export_identity(one, "/srv") == export_identity(other, "/srv")
    assert repeated_export(["nbd://elsewhere/", one, other], "/srv") == (1, 2)


@pytest.mark.parametrize(("one", "other"), DIFFERENT_EXPORTS)
def test_fan_export_identity_keeps_what_may_differ_apart(one: str, other: str) -> None:
    assert export_identity(one, "/srv/sub") != export_identity(other, "/srv/sub")
    assert repeated_export([one, other], "/srv/sub") is None


def test_fan_export_identity_keys() -> None:
    assert export_identity("nbd+unix:///d%2Fe?socket=./m.sock", "/run/x") == (
        "unix", "/run/x/m.sock", "d/e")  # fmt: skip
    assert export_identity("nbds://Example.COM:10900/vm") == ("tcp", "example.com", 10900, "vm")
    assert export_identity("nbd://h") == ("tcp", "h", 10809, "")
    assert export_identity("nbd+unix:///?socket=m.sock") == (
        "unix", os.path.join(os.getcwd(), "m.sock"), "")  # fmt: skip
    assert export_identity("disk.img") == ("uri", "disk.img")
    assert export_identity("nbd://h:port/x") == ("uri", "nbd://h:port/x")


#: (fan, upstreams with {a}/{b} for two member nodes' URIs, and {a_rel} for the first one's
#: socket relative to the fan's directory, members that are one export, as the message shows)
REPEATS = [
    ("stripe", ["{a}", "{a_rel}"], "members 0 and 1 are the same export ({a} and {a_rel})"),
    ("concat", ["{a}", "{b}", "{a_rel}"], "members 0 and 2 are the same export ({a} and {a_rel})"),
    ("mirror", ["{a}", "{a}"], "members 0 and 1 are the same export ({a} given twice)"),
    ("parity", ["{b}", "{a}", "{a}"], "members 1 and 2 are the same export ({a} given twice)"),
    ("quorum", ["{a}", "{b}", "{b}"], "members 1 and 2 are the same export ({b} given twice)"),
    ("verify", ["{a_rel}", "{a}"], "members 0 and 1 are the same export ({a_rel} and {a})"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "upstreams", "message"), REPEATS, ids=[r[0] for r in REPEATS])
def test_fan_node_refuses_one_export_as_two_members(
    start_node: Any, tmp_path: Path, kind: str, upstreams: list[str], message: str
) -> None:
    """As mdadm refuses a device given twice: the fan does not start (else it served, and
    `--run true` ended it with 0), and says which members are one export, however spelled."""
    a = start_node("memory", "8M", listen=f"unix:{tmp_path}/a.sock")
    b = start_node("memory", "8M")
    uris = {"a": a.uri, "b": b.uri, "a_rel": "nbd+unix:///?socket=./a.sock"}
    args = [arg for u in upstreams for arg in ("--upstream", u.format(**uris))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(
        [*NBDFABRIC, "node", kind, *args, "--listen", f"unix:{tmp_path}/fan.sock", "--run", "true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert res.stderr == (
        f"nbdfabric node {kind}: {message.format(**uris)}: each member must be a different "
        "export, or the fan would use one as two\n"
    )
    assert not (tmp_path / "fan.sock").exists()
