"""The filter catalog: delay, error, rate, retry, offset, truncate, partition, log, stats.

Each filter runs in a real server (NodeRuntime on a unix socket, its event loop in a thread)
over a memory plugin, driven by real clients (libnbd, qemu-img); where nbdkit has the same
filter, ours is compared with it over the same content.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import random
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import errno_of, export_info, mem, nbd_connect, read_all, run, sha, wait_for

from nodes.base import Backend, Filter
from nodes.filters.delay import Delay, DelayParams
from nodes.filters.error import Error, ErrorParams
from nodes.filters.log import Log, LogParams
from nodes.filters.offset import Offset, OffsetParams
from nodes.filters.partition import Partition, PartitionError, PartitionParams
from nodes.filters.rate import Rate, RateParams, parse_rate
from nodes.filters.retry import Retry, RetryParams
from nodes.filters.stats import Stats, StatsParams
from nodes.filters.truncate import Truncate, TruncateParams
from nodes.params import Params, parse_params
from nodes.server.addresses import parse_address
from nodes.server.node import NodeOptions, NodeRuntime

MiB = 1 << 20
_sockets = itertools.count()


def params(model: type[Params], *words: str) -> Any:
    return parse_params("test", model, list(words))


@dataclass
class Served:
    runtime: NodeRuntime
    uri: str
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def configure(self, **changes: Any) -> None:
        async def apply() -> None:
            self.runtime.configure(changes)

        self.call(apply())


@contextmanager
def serve(backend: Backend, tmp_path: Path, **options: Any) -> Iterator[Served]:
    """Serve `backend` on a unix socket from an event loop in a thread."""
    sock = tmp_path / f"f{next(_sockets)}.sock"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def up() -> NodeRuntime:
        runtime = NodeRuntime(backend, NodeOptions(**options))
        await runtime.start(None, [parse_address(f"unix:{sock}")])
        return runtime

    try:
        runtime = asyncio.run_coroutine_threadsafe(up(), loop).result(30)
        served = Served(runtime, runtime.uris()[0], loop)
        try:
            yield served
        finally:
            served.call(runtime.shutdown())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# delay ---------------------------------------------------------------------------------------


def test_delay_params_nbdkit_spellings() -> None:
    p = params(DelayParams, "rdelay=10ms", "wdelay=2", "delay-zero=1s", "delay-open=250us")
    assert (p.delay_read, p.delay_write, p.delay_trim, p.delay_zero) == (0.01, 2.0, 2.0, 1.0)
    assert p.delay_open == pytest.approx(0.00025)
    with pytest.raises(ValueError, match="delay-read"):
        params(DelayParams, "delay-read=soon")


@pytest.mark.parametrize(
    ("param", "op"),
    [
        ("delay-read", lambda h: h.pread(4096, 0)),
        ("delay-write", lambda h: h.pwrite(b"x" * 4096, 0)),
        ("delay-zero", lambda h: h.zero(4096, 0)),
        ("delay-trim", lambda h: h.trim(4096, 0)),
        ("delay-flush", lambda h: h.flush()),
        ("delay-cache", lambda h: h.cache(4096, 0)),
        ("delay-extents", lambda h: h.block_status(4096, 0, lambda *a: 0)),
    ],
)
def test_delay_each_operation_waits(tmp_path: Path, param: str, op: Any) -> None:
    backend = Delay(params(DelayParams, f"{param}=200ms"), mem(size=MiB))
    with serve(backend, tmp_path) as s:
        h = nbd_connect(s.uri)
        t0 = time.monotonic()
        op(h)
        assert time.monotonic() - t0 >= 0.19
        h.shutdown()


def test_delay_live_change_applies_to_next_request(tmp_path: Path) -> None:
    backend = Delay(params(DelayParams), mem(b"\x5a" * 4096, size=MiB))
    with serve(backend, tmp_path) as s:
        h = nbd_connect(s.uri)
        s.configure(**{"delay-read": "300ms"})
        t0 = time.monotonic()
        assert bytes(h.pread(4096, 0)) == b"\x5a" * 4096
        assert time.monotonic() - t0 >= 0.29
        h.shutdown()


def test_delay_open_and_close(tmp_path: Path) -> None:
    backend = Delay(params(DelayParams, "delay-open=300ms", "delay-close=300ms"), mem(size=MiB))
    with serve(backend, tmp_path) as s:
        t0 = time.monotonic()
        h = nbd_connect(s.uri)
        h.pread(512, 0)
        assert time.monotonic() - t0 >= 0.29
        t1 = time.monotonic()
        h.shutdown()
        wait_for(lambda: not s.runtime.sessions, 10, "the session to close")
        assert time.monotonic() - t1 >= 0.29


def test_delay_fast_zero_refused_at_once(tmp_path: Path) -> None:
    backend = Delay(params(DelayParams, "delay-zero=5s", "delay-fast-zero=no"), mem(size=MiB))
    with serve(backend, tmp_path) as s:
        h = nbd_connect(s.uri)
        assert h.can_fast_zero()
        assert errno_of(h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO) == "ENOTSUP"
        h.shutdown()


# error ---------------------------------------------------------------------------------------

_OPS = {
    "pread": lambda h: h.pread(4096, 0),
    "pwrite": lambda h: h.pwrite(b"y" * 4096, 0),
    "zero": lambda h: h.zero(4096, 0),
    "trim": lambda h: h.trim(4096, 0),
    "cache": lambda h: h.cache(4096, 0),
    "extents": lambda h: h.block_status(4096, 0, lambda *a: 0),
    "flush": lambda h: h.flush(),
}


@pytest.mark.parametrize(
    ("words", "expect"),
    [
        (["error-rate=100%", "error=ENOSPC"], dict.fromkeys(_OPS, "ENOSPC")),
        (["error-rate=100%", f"error={errno.EPERM}"], dict.fromkeys(_OPS, "EPERM")),  # a number
        (["error-rate=1"], dict.fromkeys(_OPS, "EIO")),
        (
            ["error=ENOSPC", "error-pwrite-rate=100%", "error-zero-rate=100%"],
            {**dict.fromkeys(_OPS), "pwrite": "ENOSPC", "zero": "ENOSPC"},
        ),
        (
            ["error-rate=100%", "error-pread=EPERM", "error-flush-rate=0"],
            {**dict.fromkeys(_OPS, "EIO"), "pread": "EPERM", "flush": None},
        ),
        (["error-rate=0%"], dict.fromkeys(_OPS)),
    ],
)
def test_error_injects_the_chosen_errno(
    tmp_path: Path, words: list[str], expect: dict[str, str | None]
) -> None:
    with serve(Error(params(ErrorParams, *words), mem(size=MiB)), tmp_path) as s:
        h = nbd_connect(s.uri)
        seen = {op: errno_of(fn, h) for op, fn in _OPS.items()}
        h.shutdown()
    assert seen == expect


def test_error_file_triggers_and_clears(tmp_path: Path) -> None:
    trigger = tmp_path / "inject"
    filt = Error(params(ErrorParams, "error-rate=100%", f"error-file={trigger}"), mem(size=MiB))
    with serve(filt, tmp_path) as s:
        h = nbd_connect(s.uri)
        assert errno_of(h.pread, 512, 0) is None
        trigger.touch()
        assert errno_of(h.pread, 512, 0) == "EIO"
        trigger.unlink()
        assert errno_of(h.pread, 512, 0) is None
        h.shutdown()
    assert filt.status()["injected"]["pread"] == 1


def test_error_seed_makes_failures_replayable(tmp_path: Path) -> None:
    def pattern() -> list[bool]:
        filt = Error(params(ErrorParams, "error-rate=50%", "seed=42"), mem(size=MiB))
        with serve(filt, tmp_path) as s:
            h = nbd_connect(s.uri)
            out = [errno_of(h.pread, 512, 0) is not None for _ in range(60)]
            h.shutdown()
        return out

    first = pattern()
    assert first == pattern()
    assert 10 < sum(first) < 50  # really random, really 50%-ish


def test_error_matches_nbdkit(tmp_path: Path, start_nbdkit: Any) -> None:
    theirs = start_nbdkit("--filter=error", "memory", "1M", "error-rate=100%", "error=ENOSPC")
    ours = Error(params(ErrorParams, "error-rate=100%", "error=ENOSPC"), mem(size=MiB))
    compared = ["pread", "pwrite", "zero", "trim", "cache", "extents"]
    with serve(ours, tmp_path) as s:
        results = []
        for uri in (s.uri, theirs.uri):
            h = nbd_connect(uri)
            results.append({op: errno_of(_OPS[op], h) for op in compared})
            h.shutdown()
    assert results[0] == results[1] == dict.fromkeys(compared, "ENOSPC")


# rate ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2M", 2 * MiB),
        ("512K", 512 * 1024),
        ("2MiB/s", 2 * MiB),
        ("1000", 1000),
        ("16Mbps", 2 * MiB),
        ("8Kbit", 1024),
    ],
)
def test_rate_parse(text: str, value: int) -> None:
    assert parse_rate(text) == value


def test_rate_limits_a_large_read(tmp_path: Path) -> None:
    data = random_bytes(4 * MiB, 1)
    with serve(Rate(params(RateParams, "rate=2M"), mem(data)), tmp_path) as s:
        h = nbd_connect(s.uri)
        t0 = time.monotonic()
        assert sha(h.pread(4 * MiB, 0)) == sha(data)
        assert time.monotonic() - t0 >= 1.5
        h.shutdown()


def test_rate_splits_large_requests_into_slices(tmp_path: Path) -> None:
    logfile = tmp_path / "below.jsonl"
    below = Log(params(LogParams, f"logfile={logfile}"), mem(size=4 * MiB))
    with serve(Rate(params(RateParams, "rate=4M"), below), tmp_path) as s:
        h = nbd_connect(s.uri)
        h.pwrite(b"\x11" * MiB, 0)
        h.shutdown()
    writes = [json.loads(x) for x in logfile.read_text().splitlines()]
    writes = [r for r in writes if r.get("op") == "write"]
    assert len(writes) >= 2  # at 4 MiB/s, 1 MiB moves as ~0.1 s slices
    assert sum(r["count"] for r in writes) == MiB
    assert [r["offset"] for r in writes] == sorted(r["offset"] for r in writes)


def test_rate_client_rate_is_shared_by_connections_from_one_client(tmp_path: Path) -> None:
    data = random_bytes(MiB, 2)
    with serve(Rate(params(RateParams, "client-rate=1M"), mem(data)), tmp_path) as s:
        handles = [nbd_connect(s.uri) for _ in range(2)]
        out: list[bytes] = []
        t0 = time.monotonic()
        threads = [
            threading.Thread(target=lambda h=h: out.append(bytes(h.pread(MiB, 0)))) for h in handles
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # 2 MiB through one 1 MiB/s bucket (an empty bucket at start)
        assert time.monotonic() - t0 >= 1.5
        assert [sha(b) for b in out] == [sha(data)] * 2
        for h in handles:
            h.shutdown()


def test_rate_file_and_live_change(tmp_path: Path) -> None:
    rate_file = tmp_path / "rate"
    filt = Rate(params(RateParams, "rate=1M", f"rate-file={rate_file}"), mem(size=MiB))
    assert filt.status()["rates"]["rate"] == MiB
    rate_file.write_text("3M\n")
    time.sleep(0.06)
    assert filt.status()["rates"]["rate"] == 3 * MiB
    filt.configure({"connection-rate": "5M"})
    assert filt.status()["rates"]["connection-rate"] == 5 * MiB


# retry ---------------------------------------------------------------------------------------


class Reconnectable(Filter):
    """A pass-through that can be reopened, as the libnbd upstream can."""

    kind = "test-reconnectable"

    def __init__(self, next: Backend) -> None:
        super().__init__(Params(), next)
        self.reconnects = 0

    async def reconnect(self) -> None:
        self.reconnects += 1


def retry_chain(retry_words: list[str], error_words: list[str]) -> tuple[Retry, Reconnectable]:
    flaky = Reconnectable(Error(params(ErrorParams, *error_words), mem(b"\x77" * MiB)))
    return Retry(params(RetryParams, *retry_words), flaky), flaky


def test_retry_hides_a_transient_failure(tmp_path: Path) -> None:
    trigger = tmp_path / "inject"
    trigger.touch()
    retry, flaky = retry_chain(
        ["retries=50", "retry-delay=50ms", "retry-exponential=no"],
        ["error-rate=100%", f"error-file={trigger}"],
    )
    with serve(retry, tmp_path) as s:
        h = nbd_connect(s.uri)
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(bytes(h.pread(65536, 0))))
        reader.start()
        wait_for(lambda: retry.retried >= 2, 10, "a few retries")
        trigger.unlink()
        reader.join(20)
        assert result == [b"\x77" * 65536]
        h.shutdown()
    assert retry.retried >= 2
    assert flaky.reconnects == retry.retried


def test_retry_gives_up_after_retries(tmp_path: Path) -> None:
    retry, flaky = retry_chain(["retries=3", "retry-delay=10ms"], ["error-rate=100%"])
    with serve(retry, tmp_path) as s:
        h = nbd_connect(s.uri)
        t0 = time.monotonic()
        assert errno_of(h.pread, 512, 0) == "EIO"
        assert time.monotonic() - t0 >= 0.07  # 10 + 20 + 40 ms: exponential
        assert (retry.retried, retry.gave_up, flaky.reconnects) == (3, 1, 3)
        h.shutdown()


def test_retry_answers_a_fast_zero_at_once(tmp_path: Path) -> None:
    """ENOTSUP to a fast zero is the answer ("not fast here"), not a failure to retry: qemu-img
    probes with one before a copy, and waited out every retry and reopen for it."""
    retry, flaky = retry_chain(["retries=3", "retry-delay=10ms"],
                               ["error-zero=ENOTSUP", "error-zero-rate=100%"])  # fmt: skip
    with serve(retry, tmp_path) as s:
        h = nbd_connect(s.uri)
        assert h.can_fast_zero()
        assert errno_of(h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO) == "ENOTSUP"
        h.shutdown()
    assert (retry.retried, retry.gave_up, flaky.reconnects) == (0, 0, 0)


def test_retry_only_on_chosen_errors(tmp_path: Path) -> None:
    retry, _ = retry_chain(
        ["retry-on=EIO,ECONNRESET", "retry-delay=10ms"], ["error-rate=100%", "error=ENOSPC"]
    )
    with serve(retry, tmp_path) as s:
        h = nbd_connect(s.uri)
        assert errno_of(h.pwrite, b"z" * 512, 0) == "ENOSPC"
        h.shutdown()
    assert retry.retried == 0


def test_retry_pattern_decides_per_failure(tmp_path: Path) -> None:
    retry, _ = retry_chain(
        ["retry-pattern=RRO", "retries=10", "retry-delay=0"], ["error-rate=100%"]
    )
    with serve(retry, tmp_path) as s:
        h = nbd_connect(s.uri)
        assert errno_of(h.pread, 512, 0) == "EIO"  # R, R, then O lets it through
        assert retry.retried == 2
        assert errno_of(h.pread, 512, 0) == "EIO"  # the pattern repeats
        assert retry.retried == 4
        h.shutdown()


def test_retry_readonly_refuses_writes_after_a_failure(tmp_path: Path) -> None:
    trigger = tmp_path / "inject"
    trigger.touch()
    retry, _ = retry_chain(
        ["retry-readonly=yes", "retry-delay=0", "retries=1"],
        ["error-pread-rate=100%", f"error-file={trigger}"],
    )
    with serve(retry, tmp_path) as s:
        h = nbd_connect(s.uri)
        assert errno_of(h.pwrite, b"a" * 512, 0) is None
        assert errno_of(h.pread, 512, 0) == "EIO"
        trigger.unlink()
        assert errno_of(h.pwrite, b"a" * 512, 0) == "EPERM"
        assert errno_of(h.pread, 512, 0) is None
        h.shutdown()
        h2 = nbd_connect(s.uri)  # a new connection writes again
        assert errno_of(h2.pwrite, b"a" * 512, 0) is None
        h2.shutdown()


# offset --------------------------------------------------------------------------------------


@pytest.fixture
def disk4m(tmp_path: Path) -> tuple[Path, bytes]:
    data = random_bytes(4 * MiB, 7)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(
    "words", [["offset=1M", "range=1M"], ["offset=3M"], ["range=512K"], ["offset=4M"]]
)
def test_offset_matches_nbdkit(
    tmp_path: Path, start_nbdkit: Any, disk4m: tuple[Path, bytes], words: list[str]
) -> None:
    path, data = disk4m
    theirs = start_nbdkit("--filter=offset", "file", str(path), *words)
    with serve(Offset(params(OffsetParams, *words), mem(data)), tmp_path) as s:
        h1, h2 = nbd_connect(s.uri), nbd_connect(theirs.uri)
        assert h1.get_size() == h2.get_size()
        h1.shutdown()
        h2.shutdown()
        assert sha(read_all(s.uri)) == sha(read_all(theirs.uri))
        if h1.get_size():
            run(["qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, theirs.uri])


def test_offset_writes_land_shifted_and_extents_follow(tmp_path: Path) -> None:
    below = mem(size=4 * MiB)
    with serve(Offset(params(OffsetParams, "offset=1M", "range=2M"), below), tmp_path) as s:
        h = nbd_connect(s.uri)
        h.pwrite(b"\xee" * 65536, 65536)
        entries: list[int] = []
        h.block_status(2 * MiB, 0, lambda meta, off, e, err: entries.extend(e) or 0)
        h.shutdown()
    buf = bytearray(65536)
    asyncio.run(below.pread(memoryview(buf), MiB + 65536, 0))
    assert buf == b"\xee" * 65536
    pairs = list(zip(entries[::2], entries[1::2], strict=True))
    assert sum(n for n, _ in pairs) == 2 * MiB
    assert pairs[0] == (65536, 3)  # hole|zero before the write, shifted into our view
    assert pairs[1][1] == 0


def test_offset_past_the_end_is_refused() -> None:
    with pytest.raises(ValueError, match="past the end"):
        asyncio.run(
            Offset(params(OffsetParams, "offset=1M", "range=4M"), mem(size=4 * MiB)).start()
        )


# truncate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "words",
    [
        ["truncate=1M"],
        ["truncate=5M"],
        ["truncate=3000001", "round-up=4096"],
        ["truncate=3000001", "round-down=4096"],
        ["truncate=3M", "round-down=2M"],
    ],
)
def test_truncate_matches_nbdkit(
    tmp_path: Path, start_nbdkit: Any, disk4m: tuple[Path, bytes], words: list[str]
) -> None:
    path, data = disk4m
    theirs = start_nbdkit("--filter=truncate", "file", str(path), *words)
    with serve(Truncate(params(TruncateParams, *words), mem(data)), tmp_path) as s:
        assert sha(read_all(s.uri)) == sha(read_all(theirs.uri))
        errs = []
        for uri in (s.uri, theirs.uri):
            h = nbd_connect(uri)
            size = h.get_size()
            tail = min(size, 4 * MiB + 4096) - 4096
            errs.append(
                (
                    size,
                    errno_of(h.pwrite, bytes(4096), tail),
                    errno_of(h.pwrite, b"\x01" * 4096, tail),
                )
            )
            h.shutdown()
        assert errs[0] == errs[1]


@pytest.mark.parametrize(
    ("words", "size"),
    [(["round-up=3M"], 6 * MiB), (["round-down=3M"], 3 * MiB), (["truncate=1"], 1)],
)
def test_truncate_rounds_to_any_multiple(words: list[str], size: int) -> None:
    filt = Truncate(params(TruncateParams, *words), mem(size=4 * MiB))  # nbdkit: powers of 2 only
    asyncio.run(filt.start())
    assert filt.capabilities().size == size


def test_truncate_grown_tail_reads_zero_and_is_a_hole(tmp_path: Path) -> None:
    data = b"\x42" * MiB
    with serve(Truncate(params(TruncateParams, "truncate=3M"), mem(data)), tmp_path) as s:
        h = nbd_connect(s.uri)
        assert h.get_size() == 3 * MiB
        buf = bytes(h.pread(2 * MiB, MiB - 4096))
        assert buf == b"\x42" * 4096 + bytes(2 * MiB - 4096)
        entries: list[int] = []
        h.block_status(3 * MiB, 0, lambda meta, off, e, err: entries.extend(e) or 0)
        assert entries == [MiB, 0, 2 * MiB, 3]
        assert errno_of(h.pwrite, b"\x01", 2 * MiB) == "ENOSPC"
        h.zero(MiB, 2 * MiB)
        h.trim(MiB, 2 * MiB)
        h.shutdown()


# partition -----------------------------------------------------------------------------------

SECTOR = 512


def mbr_entry(ptype: int, lba: int, sectors: int) -> bytes:
    return struct.pack("<B3sB3sII", 0, b"\0\0\0", ptype, b"\0\0\0", lba, sectors)


def put_table(disk: bytearray, lba: int, entries: list[bytes]) -> None:
    base = lba * SECTOR
    disk[base + 446 : base + 510] = b"".join(entries).ljust(64, b"\0")
    disk[base + 510 : base + 512] = b"\x55\xaa"


def mbr_disk() -> tuple[bytes, dict[int, tuple[int, int]]]:
    """8 MiB: primaries 1, 2, an extended 3 holding logicals 5 and 6; 4 unused."""
    disk = bytearray(random_bytes(8 * MiB, 3))
    put_table(
        disk,
        0,
        [mbr_entry(0x83, 2048, 2048), mbr_entry(0x83, 4096, 2048), mbr_entry(0x05, 6144, 8192)],
    )
    put_table(disk, 6144, [mbr_entry(0x83, 2048, 2048), mbr_entry(0x05, 4096, 4096)])
    put_table(disk, 10240, [mbr_entry(0x83, 2048, 1024)])
    parts = {1: (2048, 2048), 2: (4096, 2048), 5: (8192, 2048), 6: (12288, 1024)}
    return bytes(disk), parts


def gpt_disk() -> tuple[bytes, dict[int, tuple[int, int]]]:
    """8 MiB GPT (128 entries): partitions 1, 2 and 4; 3 unused."""
    size = 8 * MiB
    last_lba = size // SECTOR - 1
    disk = bytearray(random_bytes(size, 4))
    put_table(disk, 0, [mbr_entry(0xEE, 1, last_lba)])
    parts = {1: (2048, 2048), 2: (4096, 4096), 4: (10240, 2048)}
    entries = bytearray(128 * 128)
    linux = bytes.fromhex("af3dc60f838472478e793d69d8477de4")
    for n, (first, count) in parts.items():
        entry = struct.pack("<16s16sQQQ", linux, os.urandom(16), first, first + count - 1, 0)
        entries[(n - 1) * 128 : (n - 1) * 128 + len(entry)] = entry
    header = struct.pack(
        "<8sIIIIQQQQ16sQIII",
        b"EFI PART",
        0x10000,
        92,
        0,
        0,
        1,
        last_lba,
        34,
        last_lba - 33,
        os.urandom(16),
        2,
        128,
        128,
        zlib.crc32(entries),
    )
    header = header[:16] + struct.pack("<I", zlib.crc32(header)) + header[20:]
    disk[SECTOR : 2 * SECTOR] = header.ljust(SECTOR, b"\0")
    disk[2 * SECTOR : 2 * SECTOR + len(entries)] = entries
    # the backup copy at the end of the disk
    backup = bytearray(header)
    struct.pack_into("<QQ", backup, 24, last_lba, 1)
    struct.pack_into("<Q", backup, 72, last_lba - 32)
    struct.pack_into("<I", backup, 16, 0)
    struct.pack_into("<I", backup, 16, zlib.crc32(bytes(backup)))
    disk[(last_lba - 32) * SECTOR : last_lba * SECTOR] = entries
    disk[last_lba * SECTOR : size] = bytes(backup).ljust(SECTOR, b"\0")
    return bytes(disk), parts


@pytest.mark.parametrize(
    ("make", "number"),
    [(mbr_disk, 1), (mbr_disk, 2), (mbr_disk, 5), (mbr_disk, 6), (gpt_disk, 1), (gpt_disk, 4)],
)
def test_partition_matches_nbdkit(
    tmp_path: Path, start_nbdkit: Any, make: Any, number: int
) -> None:
    disk, parts = make()
    path = tmp_path / "parted.img"
    path.write_bytes(disk)
    first, count = parts[number]
    expected = disk[first * SECTOR : (first + count) * SECTOR]
    theirs = start_nbdkit("--filter=partition", "file", str(path), f"partition={number}")
    filt = Partition(params(PartitionParams, f"partition={number}"), mem(disk))
    with serve(filt, tmp_path) as s:
        assert sha(read_all(s.uri)) == sha(expected) == sha(read_all(theirs.uri))
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, theirs.uri])
        h = nbd_connect(s.uri)
        h.pwrite(b"\xab" * 512, count * SECTOR - 512)  # the last sector is ours to write
        h.shutdown()
    assert filt.status()["table"] == ("gpt" if make is gpt_disk else "mbr")


@pytest.mark.parametrize(
    ("make", "number", "message"),
    [
        (mbr_disk, 4, "MBR partition 4 is unused"),
        (mbr_disk, 7, "no logical partition 7"),
        (gpt_disk, 3, "GPT partition 3 is unused"),
        (gpt_disk, 200, "the GPT has 128 entries"),
        (lambda: (bytes(MiB), {}), 1, "no partition table"),
    ],
)
def test_partition_missing_gives_a_clear_error(make: Any, number: int, message: str) -> None:
    disk, _ = make()
    filt = Partition(params(PartitionParams, f"partition={number}"), mem(disk))
    with pytest.raises(PartitionError, match=message):
        asyncio.run(filt.start())


# log -----------------------------------------------------------------------------------------


def test_log_writes_one_json_line_per_request(tmp_path: Path) -> None:
    logfile = tmp_path / "requests.jsonl"
    trigger = tmp_path / "inject"
    below = Error(
        params(ErrorParams, "error-pread-rate=100%", f"error-file={trigger}"), mem(size=MiB)
    )
    with serve(Log(params(LogParams, f"logfile={logfile}"), below), tmp_path) as s:
        h = nbd_connect(s.uri)
        for i in range(3):
            h.pwrite(b"w" * 4096, i * 4096, nbd.CMD_FLAG_FUA if i == 2 else 0)
        h.pread(4096, 0)
        h.pread(8192, 4096)
        trigger.touch()
        assert errno_of(h.pread, 512, 0) == "EIO"
        h.flush()
        h.shutdown()
        wait_for(lambda: '"close"' in logfile.read_text(), 10, "the close event")
    records = [json.loads(line) for line in logfile.read_text().splitlines()]
    conn = next(r for r in records if r["event"] == "open")["connection"]
    requests = [r for r in records if r["event"] == "request" and r["connection"] == conn]
    assert [r["op"] for r in requests] == ["write"] * 3 + ["read"] * 3 + ["flush"]
    assert [r["id"] for r in requests] == list(range(1, 8))
    assert requests[2]["flags"] == ["fua"]
    assert (requests[4]["offset"], requests[4]["count"]) == (4096, 8192)
    assert requests[5]["result"] == "error" and requests[5]["errno"] == "EIO"
    assert all(r["result"] == "ok" for r in requests if r is not requests[5])
    assert all(r["duration"] >= 0 for r in requests)
    events = [r["event"] for r in records]
    assert events[0] == "ready" and events[-1] == "stop"
    assert events.count("open") == events.count("close") == 1
    close = next(r for r in records if r["event"] == "close")
    assert close["transactions"] == 7


# stats ---------------------------------------------------------------------------------------


def test_stats_live_in_file_and_status(tmp_path: Path) -> None:
    statsfile = tmp_path / "stats.json"
    filt = Stats(
        params(StatsParams, f"statsfile={statsfile}", "statsformat=json", "statsinterval=50ms"),
        mem(size=MiB),
    )
    with serve(filt, tmp_path) as s:
        h = nbd_connect(s.uri)
        for i in range(4):
            h.pwrite(b"s" * 4096, i * 4096)
        h.pread(65536, 0)
        h.zero(4096, 0)
        h.flush()

        def written() -> dict[str, Any] | None:
            try:
                snap = json.loads(statsfile.read_text())
            except (OSError, ValueError):
                return None
            return snap if snap["ops"]["write"]["count"] == 4 else None

        snap = wait_for(written, 10, "the live stats file")
        assert snap["ops"]["write"]["bytes"] == 4 * 4096
        assert snap["ops"]["read"]["count"] == 1 and snap["ops"]["read"]["bytes"] == 65536
        live = filt.status()["stats"]
        assert live["ops"]["zero"]["count"] == 1 and live["ops"]["flush"]["count"] == 1
        assert sum(live["ops"]["write"]["buckets"]) == 4
        h.shutdown()
    final = json.loads(statsfile.read_text())
    # the node flushes once more as it stops, after the client's 7 requests
    assert final["total"]["count"] == 8 and final["ops"]["flush"]["count"] == 2
    assert final["connections"] == 1


def test_stats_text_report_at_stop(tmp_path: Path) -> None:
    statsfile = tmp_path / "stats.txt"
    with serve(Stats(params(StatsParams, f"statsfile={statsfile}"), mem(size=MiB)), tmp_path) as s:
        h = nbd_connect(s.uri)
        h.pread(4096, 8192)
        h.shutdown()
    text = statsfile.read_text()
    assert text.startswith("total: 2 ops")  # the read and the flush at stop
    assert "read: 1 ops" in text and "13 bits" in text and "13 bit aligned" in text


# process chains: each filter its own node, reached through libnbd ---------------------------


def stop_chain(*procs: Any) -> None:
    """Stop from the client end down: an upstream that goes first makes the nodes above retry
    (retry) or wait (nbdkit keeps serving until its clients leave)."""
    for p in reversed(procs):
        p.stop()


def test_chain_retry_over_error_node_hides_the_failure(tmp_path: Path, start_node: Any) -> None:
    trigger = tmp_path / "inject"
    trigger.touch()
    m = start_node("memory", "1M")
    e = start_node("error", "error-rate=100%", f"error-file={trigger}", upstreams=[m.uri])
    r = start_node(
        "retry", "retries=100", "retry-delay=50ms", "retry-exponential=no", upstreams=[e.uri]
    )
    h = nbd_connect(r.uri)
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(bytes(h.pread(65536, 0))))
    reader.start()
    time.sleep(0.4)  # several attempts fail meanwhile
    assert reader.is_alive()
    trigger.unlink()
    reader.join(20)
    assert result == [bytes(65536)]
    h.pwrite(b"\x99" * 65536, 0)
    assert bytes(h.pread(65536, 0)) == b"\x99" * 65536
    h.shutdown()
    stop_chain(m, e, r)


def test_chain_retry_survives_an_upstream_restart(tmp_path: Path, start_node: Any) -> None:
    m = start_node("memory", "1M")
    r = start_node(
        "retry", "retries=100", "retry-delay=100ms", "retry-exponential=no", upstreams=[m.uri]
    )
    h = nbd_connect(r.uri)
    h.pwrite(b"\x55" * 4096, 0)
    m.kill()
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(bytes(h.pread(4096, 0))))
    reader.start()
    time.sleep(0.3)
    m2 = start_node("memory", "1M", listen=f"unix:{m.socket}")  # a fresh, empty disk
    reader.join(30)
    assert result == [bytes(4096)]
    h.shutdown()
    stop_chain(m2, r)


def test_chain_delay_and_log_nodes(tmp_path: Path, start_node: Any) -> None:
    logfile = tmp_path / "chain.jsonl"
    m = start_node("memory", "4M")
    d = start_node("delay", "delay-write=200ms", upstreams=[m.uri])
    lg = start_node("log", f"logfile={logfile}", upstreams=[d.uri])
    t0 = time.monotonic()
    run(["qemu-io", "-f", "raw", "-t", "writeback", lg.uri,
         "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 64k 64k",
         "-c", "read -P 0xab 0 64k", "-c", "read -P 0xcd 64k 64k"])  # fmt: skip
    assert time.monotonic() - t0 >= 0.4
    lg.stop()
    records = [json.loads(line) for line in logfile.read_text().splitlines()]
    ops = [r["op"] for r in records if r["event"] == "request" and r["connection"]]
    assert ops.count("write") == 2 and ops.count("read") == 2
    assert all(r["duration"] >= 0.19 for r in records if r.get("op") == "write")


def test_chain_offset_node_matches_nbdkit_over_the_same_upstream(
    tmp_path: Path, start_node: Any, start_nbdkit: Any, disk4m: tuple[Path, bytes]
) -> None:
    path, _ = disk4m
    upstream = start_nbdkit("file", str(path))
    ours = start_node("offset", "offset=1M", "range=2M", upstreams=[upstream.uri])
    theirs = start_nbdkit("--filter=offset", "file", str(path), "offset=1M", "range=2M")
    assert export_info(ours.uri)["export-size"] == export_info(theirs.uri)["export-size"]
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", ours.uri, theirs.uri])
    stop_chain(upstream, ours)


def test_chain_partition_node_over_nbdkit(
    tmp_path: Path, start_node: Any, start_nbdkit: Any
) -> None:
    disk, parts = mbr_disk()
    path = tmp_path / "parted.img"
    path.write_bytes(disk)
    upstream = start_nbdkit("file", str(path))
    ours = start_node("partition", "partition=5", upstreams=[upstream.uri])
    first, count = parts[5]
    assert sha(read_all(ours.uri)) == sha(disk[first * SECTOR : (first + count) * SECTOR])
    bad = start_node("partition", "partition=4", upstreams=[upstream.uri], wait=False)
    assert bad.proc.wait(30) == 1
    assert "MBR partition 4 is unused" in bad.stderr()
    stop_chain(upstream, ours)


def test_chain_truncate_rate_stats_nodes_match_nbdkit(
    tmp_path: Path, start_node: Any, start_nbdkit: Any, disk4m: tuple[Path, bytes]
) -> None:
    path, _ = disk4m
    statsfile = tmp_path / "chain-stats.json"
    upstream = start_nbdkit("file", str(path))
    t = start_node("truncate", "truncate=5M", upstreams=[upstream.uri])
    r = start_node("rate", "rate=8M", upstreams=[t.uri])
    s = start_node("stats", f"statsfile={statsfile}", "statsformat=json", upstreams=[r.uri])
    theirs = start_nbdkit("--filter=truncate", "file", str(path), "truncate=5M")
    t0 = time.monotonic()
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, theirs.uri])
    assert time.monotonic() - t0 >= 0.5  # 5 MiB through 8 MiB/s, starting with an empty bucket
    stop_chain(upstream, t, r, s)
    snap = json.loads(statsfile.read_text())
    # qemu-img skips what block status calls zero: the grown 1 MiB tail is never read
    assert snap["ops"]["read"]["bytes"] >= 4 * MiB
    assert snap["ops"]["extents"]["count"] >= 1
    assert snap["ops"]["read"]["errors"] == 0
