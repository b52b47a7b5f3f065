"""The parity fan's journal of degraded partial writes (md's partial parity log, in spirit): the
chunk a degraded stripe only implies, saved before a write that could garble it goes out.

While data member M of a stripe is out, its chunk D_M exists only as P ^ XOR(the other data
chunks). A partial write sends its data chunk and the parity separately; if the fan dies with one
landed and not the other, D_M (data nobody was writing) reads back as garbage. So the fan first
saves D_M over the written range in a slot here, fdatasynced, and after a crash recomputes the
parity from it (`Parity._replay_journal`). A slot is cleared (its header zeroed, not synced) once
the member writes are done.

A cleared slot that is not yet on disk may come back after a crash. It still holds the right D_M
unless a later, unjournaled write changed D_M (a write into M's own chunk, a full-stripe write, a
write while M was in sync again) or M's chunk came back in sync: `settle(stripe)` before such a
write and `sync_now()` when members change state make the clears durable first, so a replay
never writes an old D_M over a newer one. A journaled write's own fdatasync carries earlier
clears with it, and the slots of every put made while one fdatasync runs are carried by the
next (group commit): at queue depth 1 a journaled piece costs an fdatasync, at depth 16 a few
share one.

With consistency-policy=ppl (md's name) every partial write is journaled, degraded or not: with
every member in sync the entry holds the partial parity (md's PPL), the XOR of the data chunks
the write leaves alone over its range, so a crash mid-write leaves no stripe whose parity must
be found out by reading it: the replay sets parity = partial parity ^ the written chunk as it is.

Layout (little-endian), slot size = 4096 + chunk size:
  offset 0:     file header `FILE_HEADER` (magic, members, chunk, stripes, slots, CRC32), one
                block; written once when the file is made and checked at every start.
  4096 + k*slot: slot k: `SLOT_HEADER` (magic, sequence number, stripe, member with the top bit
                set for a partial parity entry, offset in the chunk, length, CRC32 of the
                header with a zero CRC field and of the data), the data at +4096. A header
                without the magic or with a bad CRC is no entry.
The file is sparse: only the written part of a slot takes disk space.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from ..offload import run_blocking

log = logging.getLogger("nbdfabric.parity")

FILE_MAGIC = b"nbdfPJ01"
SLOT_MAGIC = b"nbdfSLOT"
#: magic, members, chunk size, stripes, slots, CRC32 of the fields before it
FILE_HEADER = struct.Struct("<8sIIQII")
#: magic, sequence number, stripe, member (| PPL), offset in chunk, length, CRC32
SLOT_HEADER = struct.Struct("<8sQQIIII")
BLOCK = 4096
SLOTS = 64  #: journaled writes in flight at once (one per stripe: the stripe lock)
_ZERO_HEADER = bytes(SLOT_HEADER.size)


@dataclass(frozen=True)
class Geometry:
    """What a journal file belongs to: an array of this shape."""

    members: int
    chunk: int
    stripes: int
    slots: int = SLOTS

    @property
    def slot_size(self) -> int:
        return BLOCK + self.chunk

    @property
    def file_size(self) -> int:
        return BLOCK + self.slots * self.slot_size

    def slot_offset(self, slot: int) -> int:
        return BLOCK + slot * self.slot_size

    def header(self) -> bytes:
        fields = (FILE_MAGIC, self.members, self.chunk, self.stripes, self.slots)
        crc = zlib.crc32(FILE_HEADER.pack(*fields, 0)[:-4])
        return FILE_HEADER.pack(*fields, crc)


#: In a slot's member field: a partial parity entry (consistency-policy=ppl), not a degraded one.
PPL = 1 << 31


@dataclass(frozen=True)
class Entry:
    """One journaled piece of STRIPE over [within, within + len(data)) of a chunk. Degraded
    (`member` without PPL): the bytes of data member MEMBER, out, as the parity implied them.
    Partial parity (`member | PPL`): the XOR of every data chunk but MEMBER's, the one written;
    the parity there is that ^ MEMBER's bytes, whatever part of the write landed."""

    seq: int
    stripe: int
    member: int
    within: int
    data: bytes

    @property
    def ppl(self) -> bool:
        return bool(self.member & PPL)

    @property
    def index(self) -> int:
        """The member the entry is about (see the class docstring)."""
        return self.member & ~PPL


def encode_slot(entry: Entry) -> bytes:
    """A slot's header and data, as written (the data a block after the header)."""
    fields = (SLOT_MAGIC, entry.seq, entry.stripe, entry.member, entry.within, len(entry.data))
    crc = zlib.crc32(entry.data, zlib.crc32(SLOT_HEADER.pack(*fields, 0)))
    head = SLOT_HEADER.pack(*fields, crc)
    return head + bytes(BLOCK - len(head)) + entry.data


def decode_slot(raw: bytes, geometry: Geometry) -> Entry | None:
    """The entry a slot holds, or None: empty, torn (bad CRC) or outside the array."""
    if len(raw) < SLOT_HEADER.size:
        return None
    magic, seq, stripe, member, within, length, crc = SLOT_HEADER.unpack_from(raw)
    if magic != SLOT_MAGIC or within + length > geometry.chunk or len(raw) < BLOCK + length:
        return None
    data = raw[BLOCK : BLOCK + length]
    head = SLOT_HEADER.pack(magic, seq, stripe, member, within, length, 0)
    if zlib.crc32(data, zlib.crc32(head)) != crc:
        return None
    if stripe >= geometry.stripes or member & ~PPL >= geometry.members:
        return None
    return Entry(seq, stripe, member, within, bytes(data))


class Journal:
    """The journal file of one array: `open` it (the entries a crash left), `clear` them once
    replayed, then `put` and `release` slots around degraded partial writes."""

    def __init__(self, path: str, geometry: Geometry) -> None:
        self.path = path
        self.geometry = geometry
        self._fd = -1
        self._free = list(range(geometry.slots - 1, -1, -1))
        self._slots = asyncio.Semaphore(geometry.slots)
        self._seq = 1
        self._written = 0  #: slot writes and clears so far (their count, as a clock)
        self._durable = 0  #: how many of those an fdatasync that completed was sure to carry
        self._pending: dict[int, int] = {}  #: stripe -> its last clear not yet durable
        self._syncing: asyncio.Future[None] | None = None  #: the fdatasync under way, if any

    # Start ------------------------------------------------------------------------------------

    def open(self, fresh: bool) -> tuple[list[Entry], bool]:
        """Open the file, made anew when missing or empty, or when FRESH (the state file is new:
        a journal left there belongs to no array). The valid entries it holds, and whether it
        was there before. ValueError when it belongs to another array or is not a journal."""
        existed = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if fresh or not existed:
            self._create()
            existed = existed and not fresh
        self._fd = os.open(self.path, os.O_RDWR)
        try:
            self._check_header()
            entries = self._read_entries()
            os.ftruncate(self._fd, self.geometry.file_size)  # a truncated file: whole again
        except BaseException:
            self.close()
            raise
        if entries:
            self._seq = max(e.seq for e in entries) + 1
        return entries, existed

    def _create(self) -> None:
        """The file with its header, empty slots, on disk before it is used (written aside and
        renamed, so a crash never leaves half a header)."""
        tmp = f"{self.path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.pwrite(fd, self.geometry.header(), 0)
            os.ftruncate(fd, self.geometry.file_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def _check_header(self) -> None:
        raw = os.pread(self._fd, FILE_HEADER.size, 0)
        if len(raw) < FILE_HEADER.size or raw[:8] != FILE_MAGIC:
            raise ValueError(
                f"parity: {self.path} is not a parity journal (or it is damaged); remove it to "
                "start afresh (chunks implied while a member was out may then be rebuilt wrong)"
            )
        _, members, chunk, stripes, slots, crc = FILE_HEADER.unpack(raw)
        got = Geometry(members, chunk, stripes, slots)
        if zlib.crc32(raw[:-4]) != crc:
            raise ValueError(f"parity: journal {self.path} has a damaged header; remove it to "
                             "start afresh")  # fmt: skip
        if got != self.geometry:
            raise ValueError(
                f"parity: journal {self.path} belongs to another array ({_shape(got)}, this one "
                f"is {_shape(self.geometry)}); remove it to start afresh"
            )

    def _read_entries(self) -> list[Entry]:
        entries = []
        for slot in range(self.geometry.slots):
            off = self.geometry.slot_offset(slot)
            head = os.pread(self._fd, SLOT_HEADER.size, off)
            if head[:8] != SLOT_MAGIC:
                continue  # empty (or a hole past the end of a truncated file)
            raw = os.pread(self._fd, self.geometry.slot_size, off)
            entry = decode_slot(raw, self.geometry)
            if entry is None:
                log.warning("parity: journal %s: slot %d is torn (bad CRC): ignored",
                            self.path, slot)  # fmt: skip
            else:
                entries.append(entry)
        return entries

    def clear(self) -> None:
        """Every slot empty, on disk (after a replay: the parity it fixed is flushed)."""
        for slot in range(self.geometry.slots):
            off = self.geometry.slot_offset(slot)
            if os.pread(self._fd, len(SLOT_MAGIC), off) == SLOT_MAGIC:
                os.pwrite(self._fd, _ZERO_HEADER, off)
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            self.sync_now()
            os.close(self._fd)
            self._fd = -1

    # Writes -----------------------------------------------------------------------------------

    async def put(self, stripe: int, member: int, within: int, data: bytes) -> int:
        """Save an entry (see `Entry`: MEMBER may carry PPL) at WITHIN of STRIPE in a free slot
        (waiting for one), on disk when this returns; the slot, to `release` once the member
        writes are done."""
        await self._slots.acquire()
        slot = self._free.pop()
        entry = Entry(self._seq, stripe, member, within, data)
        self._seq += 1
        try:
            # Into the page cache (a few KiB: no wait worth a thread), then on disk with the
            # slots of every put meanwhile: one fdatasync for all (group commit).
            os.pwrite(self._fd, encode_slot(entry), self.geometry.slot_offset(slot))
            self._written += 1
            await self._sync(self._written)
        except BaseException:
            # Cancelled or failed: the write it was for does not go out, and a replay of
            # the entry, should it reach the disk, rewrites the parity the stripe has.
            self.release(slot, stripe)
            raise
        return slot

    async def _sync(self, written: int) -> None:
        """Return once an fdatasync that started after write (or clear) number WRITTEN is
        done."""
        while self._durable < written:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._sync_once())
                # Its error reaches every put waiting for it; none may be left (all cancelled).
                self._syncing.add_done_callback(lambda f: f.cancelled() or f.exception())
            await asyncio.shield(self._syncing)

    async def _sync_once(self) -> None:
        written = self._written  # what this fdatasync carries
        try:
            await run_blocking(os.fdatasync, self._fd)
        finally:
            self._syncing = None
        self._carried(written)

    def release(self, slot: int, stripe: int) -> None:
        """The member writes of SLOT's piece are done: it is free. Cleared in the page cache
        only (see the module docstring for why that is safe, with `settle`)."""
        try:
            if self._fd >= 0:  # else closed: the fan stopped (the thread of a cancelled put)
                os.pwrite(self._fd, _ZERO_HEADER, self.geometry.slot_offset(slot))
        finally:
            self._written += 1
            self._pending[stripe] = self._written
            self._free.append(slot)
            self._slots.release()

    async def settle(self, stripe: int, last: int | None = None) -> None:
        """Before an unjournaled write into STRIPE (to LAST, when given): the stripes' cleared
        slots on disk, if they are not yet, so that a crash cannot bring one back to undo this
        write."""
        if last is None:
            clear = self._pending.get(stripe, 0)  # `_carried` keeps only clears not yet durable
        else:  # a few stripes (writes since the last fdatasync), whatever the run
            clear = max((c for s, c in self._pending.items() if stripe <= s <= last), default=0)
        if clear:
            await self._sync(clear)

    def sync_now(self) -> None:
        """Every clear on disk now (members changed state: a cleared slot must not come back
        to a member that is in sync again, or out again later)."""
        if self._pending:
            written = self._written
            os.fdatasync(self._fd)
            self._carried(written)

    def _carried(self, written: int) -> None:
        """An fdatasync carried every write and clear up to number WRITTEN."""
        self._durable = max(self._durable, written)
        self._pending = {s: c for s, c in self._pending.items() if c > self._durable}

    def busy(self) -> int:
        """Slots in use now."""
        return self.geometry.slots - len(self._free)


def _shape(g: Geometry) -> dict[str, Any]:
    return {"members": g.members, "chunk": g.chunk, "stripes": g.stripes, "slots": g.slots}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
