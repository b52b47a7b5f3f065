"""qcow2dec: serve the raw disk that a qcow2 image on the upstream holds (nbdkit-qcow2dec-filter).

Read-only, as nbdkit's (1.36 and later): the upstream holds a .qcow2 file, and clients read
the guest disk in it, as `qemu-img convert -O raw` writes it. At start the node reads the
header, its extensions and the L1 table, and refuses, saying why, what it cannot serve right;
L2 tables are read when a read first needs them and kept, least recently used dropped first,
up to `qcow2dec-l2-cache` bytes of them. Reads are cut at cluster boundaries:
- unallocated clusters and clusters with the zero flag read as zeros (a hole to the client);
- standard clusters are read from the upstream where the L2 table says, neighbours that lie
  end to end in the file in one upstream read;
- compressed clusters (deflate, which qemu calls zlib) are read and inflated; the last 16
  inflated clusters (at most 32 MiB of them) are kept, as a client reading in order reads
  each in several requests.
Extents (base:allocation) come from the L2 tables: unallocated and zero clusters (and
subclusters) are holes that read as zeros, qemu-nbd's answer for both; the rest is data.
Versions 2 and 3 are read, clusters of 512 bytes to 2 MiB, and extended L2 entries
(subclusters, `qemu-img create -o extended_l2=on`). CACHE is served by reading.

Refused at start, each with a message naming the problem: not qcow2 or a truncated header; a
backing file (its name is given: a node has one upstream, and nbdfabric leaves backing
chains out: flatten the image with qemu-img convert first, or serve the chain with qemu-nbd);
encryption (AES, LUKS); an external data file; the corrupt bit; an incompatible feature bit
this node does not know (named from the image's feature name table); zstd compression (the
zstandard module is not a dependency: recompress with `-o compression_type=zlib`); an L1
table that does not cover the disk or runs past the end of the file. The dirty bit is
served: it says only that refcounts may be stale, and refcounts are not read (qemu, too,
opens such an image read-only without repairing it).

Damage found by a read (an L2 table or a cluster past the end of the file, an unaligned
entry, a zero flag in a version 2 image, a compressed cluster that does not inflate to a whole
cluster) fails that read with EIO (as qemu does) and a warning naming the guest and file
offsets; other reads are served, and nothing outside the file is ever served. A block status
request describes the disk up to the damage.

Params:
- `qcow2dec-l2-cache` (size, default 32M): L2 tables kept in memory, in bytes (at least one
  table). 32 MiB of tables map a 256 GiB disk in 64 KiB clusters.

Example: a CDI-style import of a qcow2 image from a web server, without downloading it first:
`nbdfabric node http https://images.example/disk.qcow2 --listen unix:/tmp/q.sock`, then
`nbdfabric node qcow2dec --upstream 'nbd+unix:///?socket=/tmp/q.sock' --listen
unix:/tmp/raw.sock` and `qemu-img convert -f raw 'nbd+unix:///?socket=/tmp/raw.sock' disk.img`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
from array import array
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from ..base import Backend, Capabilities, Extents, Filter, Holes, Support, add_range, read_flat
from ..offload import run_blocking
from ..params import Params, Size, param
from ..protocol.constants import CmdFlag, Extent
from ..registry import register
from ._qcow2 import BadCluster, BadMetadata, Image, Kind, Run, inflate, l2_table, open_image, plan

log = logging.getLogger("nbdfabric.qcow2dec")

#: Inflated clusters kept, and the memory they may take at most (2 MiB clusters: 16 of them).
INFLATED_KEPT = 16
INFLATED_BYTES = 32 * 1024 * 1024
#: Clusters this large are inflated in a worker thread, so the event loop serves on meanwhile.
THREAD_CLUSTER = 256 * 1024
#: Guest clusters one block status request looks at, at most (the client asks again for the
#: rest): a whole disk of 512-byte clusters would take 8 Mi entries of Python work.
EXTENT_CLUSTERS = 1 << 18
#: Upstream read size when the upstream advertises no maximum.
DEFAULT_MAX_READ = 32 * 1024 * 1024
#: Distinct damage warnings logged; later ones go to the debug log (a client scanning a
#: damaged region would otherwise fill the log with one line per request).
WARNINGS_KEPT = 100

_REQ_ONE = int(CmdFlag.REQ_ONE)
_HOLE_ZERO = int(Extent.HOLE | Extent.ZERO)
#: Run kinds as extent flags: what reads as zeros without data is a hole, as qemu-nbd says.
_EXTENT_FLAGS = {Kind.HOLE: _HOLE_ZERO, Kind.ZERO: _HOLE_ZERO, Kind.DATA: 0, Kind.COMPRESSED: 0}

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Qcow2decParams(Params):
    qcow2dec_l2_cache: Size = param(
        32 * 1024 * 1024,
        "bytes of L2 tables kept in memory (least recently used dropped first; at least one)",
    )


class SharedCache(Generic[K, V]):
    """Values by key, at most `capacity` kept (least recently used dropped first). A value
    being loaded has one task that every reader waits for; a failed load is not kept, so the
    next reader tries again."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.kept: collections.OrderedDict[K, V] = collections.OrderedDict()
        self.loading: dict[K, asyncio.Task[V]] = {}
        self.loads = 0  #: loads started

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        value = self.kept.get(key)
        if value is not None:
            self.kept.move_to_end(key)
            return value
        task = self.loading.get(key)
        if task is None:
            task = asyncio.ensure_future(load())
            task.add_done_callback(functools.partial(self._settled, key))
            self.loading[key] = task
            self.loads += 1
        # Shielded: a reader that goes away does not cancel the load the others wait for.
        return await asyncio.shield(task)

    def _settled(self, key: K, task: asyncio.Task[V]) -> None:
        del self.loading[key]
        if task.cancelled() or task.exception() is not None:
            return  # the readers waiting get the error (retrieved here: no "never retrieved")
        self.kept[key] = task.result()
        while len(self.kept) > self.capacity:
            self.kept.popitem(last=False)

    def clear(self) -> None:
        for task in self.loading.values():
            task.cancel()
        self.kept.clear()


@register
class Qcow2dec(Filter):
    """Serves the raw disk a qcow2 image on the upstream holds (read-only)."""

    kind = "qcow2dec"
    Params = Qcow2decParams
    params: Qcow2decParams

    def __init__(self, params: Qcow2decParams, next: Backend) -> None:
        super().__init__(params, next)
        self._image: Image | None = None
        self.file_size = 0
        self.align = 1  #: the upstream's minimum block size: every upstream read is aligned
        self.most = DEFAULT_MAX_READ  #: the upstream's maximum request
        self.tables: SharedCache[int, array[int]] = SharedCache(1)
        self.clusters: SharedCache[tuple[int, int], bytes] = SharedCache(1)
        self.bad_reads = 0
        self.start_bytes_read = 0
        self._warned: set[str] = set()

    @property
    def image(self) -> Image:
        assert self._image is not None, "read before start"
        return self._image

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.next.start()
        up = self.next.capabilities()
        self.file_size = up.size
        self.align = up.block_min or 1
        self.most = max(self.align, up.block_max or DEFAULT_MAX_READ)
        image = self._image = await self._open()
        if self.align > image.unit:
            raise ValueError(
                f"the upstream's minimum block size {self.align} is larger than the image's "
                f"{'subclusters' if image.extended_l2 else 'clusters'} ({image.unit} bytes)"
            )
        self.tables = SharedCache(self.params.qcow2dec_l2_cache // image.cluster_size)
        kept = min(INFLATED_KEPT, INFLATED_BYTES // image.cluster_size)
        self.clusters = SharedCache(kept)
        log.info(
            "qcow2dec: version %d, %d-byte disk in %d-byte clusters%s; L1 table: %d entries; "
            "%d bytes read at start",
            image.version, image.size, image.cluster_size,
            " (extended L2 entries)" if image.extended_l2 else "", len(image.l1),
            self.start_bytes_read,
        )  # fmt: skip
        if image.dirty:
            log.info(
                "qcow2dec: the image's dirty bit is set (its refcounts may be stale): served "
                "all the same, as refcounts are not read"
            )

    async def _open(self) -> Image:
        walk = open_image(self.file_size)
        try:
            want = next(walk)
            while True:
                data = await self._read_file(*want)
                self.start_bytes_read += want[1]
                want = walk.send(bytes(data))
        except StopIteration as done:
            return done.value

    async def stop(self) -> None:
        self.tables.clear()
        self.clusters.clear()
        await super().stop()

    # Facts ----------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        image = self.image
        preferred = max(up.block_preferred, image.cluster_size)
        if up.block_max:
            preferred = min(preferred, up.block_max)
        return Capabilities(
            size=image.size,
            cache=Support.EMULATE,  # reading is caching: L2 tables, inflated clusters, upstream
            extents=True,
            multi_conn=True,  # read-only: every connection sees the same disk
            rotational=up.rotational,
            block_min=up.block_min,
            block_preferred=preferred,
            block_max=up.block_max,
        )

    def status(self) -> dict[str, Any]:
        image = self._image
        if image is None:
            return self.next.status()
        return {
            **self.next.status(),
            "version": image.version,
            "virtual_size": image.size,
            "cluster_size": image.cluster_size,
            "extended_l2": image.extended_l2,
            "dirty": image.dirty,
            "features": image.features,
            "l2_tables_cached": len(self.tables.kept),
            "l2_tables_read": self.tables.loads,
            "compressed_clusters_cached": len(self.clusters.kept),
            "compressed_clusters_inflated": self.clusters.loads,
            "bad_reads": self.bad_reads,
        }

    # Data -----------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        runs = await self._runs(offset, len(buf))
        holes: list[tuple[int, int]] = []
        reads = []
        for run in runs:
            at = run.start - offset
            piece = buf[at : at + run.length]
            if run.kind is Kind.DATA:
                reads.append(self._read_data(piece, run.host, at))
            elif run.kind is Kind.COMPRESSED:
                reads.append(self._read_compressed(piece, run))
            else:
                holes.append((at, run.length))
        for more in await _all(reads):
            holes.extend(more)
        holes.sort()
        merged: list[tuple[int, int]] = []
        for start, length in holes:
            add_range(merged, start, length)
        return merged

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        length = min(count, EXTENT_CLUSTERS << self.image.cluster_bits)
        runs: list[Run] = []
        try:
            await self._plan(offset, length, runs)
        except OSError:
            if not runs:
                raise
            # Up to the damage: the client asks again from there and gets the error then.
        out: Extents = []
        for run in runs:
            flags_now = _EXTENT_FLAGS[run.kind]
            if out and out[-1][1] == flags_now:
                out[-1] = (out[-1][0] + run.length, flags_now)
            elif out and flags & _REQ_ONE:
                break
            else:
                out.append((run.length, flags_now))
        return out

    # The data path ----------------------------------------------------------------------------

    async def _runs(self, offset: int, length: int) -> list[Run]:
        runs: list[Run] = []
        await self._plan(offset, length, runs)
        return runs

    async def _plan(self, offset: int, length: int, runs: list[Run]) -> None:
        """The runs of [offset, offset + length) into `runs`, their L2 tables read first (all
        at once); OSError(EIO) at damaged metadata, the runs before it left in `runs`."""
        image = self.image
        wanted = image.tables_for(offset, length)
        got = await _all(
            [self.tables.get(o, functools.partial(self._load_table, o)) for o in wanted]
        )
        try:
            plan(image, dict(zip(wanted, got, strict=True)), offset, length, runs)
        except BadMetadata as exc:
            raise self._damage(str(exc)) from None

    async def _load_table(self, offset: int) -> array[int]:
        return l2_table(await self._read_file(offset, self.image.cluster_size))

    async def _read_data(self, piece: memoryview, host: int, at: int) -> list[tuple[int, int]]:
        """A window of the file read into the client's buffer: its holes, as the buffer's."""
        holes = await self.next.pread(piece, host, 0)
        return [(at + start, length) for start, length in holes or ()]

    async def _read_compressed(self, piece: memoryview, run: Run) -> list[tuple[int, int]]:
        key = (run.host, run.csize)
        cluster = await self.clusters.get(key, functools.partial(self._inflate, run))
        skip = run.start & (self.image.cluster_size - 1)
        piece[:] = memoryview(cluster)[skip : skip + len(piece)]
        return []

    async def _inflate(self, run: Run) -> bytes:
        size = self.image.cluster_size
        data = await self._read_file(run.host, run.csize)
        try:
            if size >= THREAD_CLUSTER:
                return await run_blocking(inflate, data, size)
            return inflate(data, size)
        except BadCluster as exc:
            base = run.start - run.start % size
            raise self._damage(
                f"the compressed cluster at guest offset {base} (file offset {run.host}, up to "
                f"{run.csize} bytes) is corrupt: {exc}"
            ) from None

    async def _read_file(self, offset: int, length: int) -> memoryview:
        """Bytes of the qcow2 file, read in requests the upstream takes (aligned to its
        minimum block size, split at its maximum)."""
        begin = offset - offset % self.align
        end = min(self.file_size, -(-(offset + length) // self.align) * self.align)
        view = memoryview(bytearray(end - begin))
        step = self.most - self.most % self.align
        await _all(
            [read_flat(self.next, view[p : p + step], begin + p) for p in range(0, len(view), step)]
        )
        return view[offset - begin : offset - begin + length]

    def _damage(self, message: str) -> OSError:
        """A read that found the image damaged: EIO, and a warning (once per problem)."""
        self.bad_reads += 1
        if message not in self._warned and len(self._warned) < WARNINGS_KEPT:
            self._warned.add(message)
            log.warning("qcow2dec: %s", message)
        else:
            log.debug("qcow2dec: %s", message)
        return OSError(errno.EIO, message)


async def _all(aws: Sequence[Awaitable[V]]) -> list[V]:
    """Run them together; the first error is raised once all have finished (none writes into
    a buffer the caller has already given back)."""
    if len(aws) == 1:
        return [await aws[0]]
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]
