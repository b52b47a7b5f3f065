"""partition: serve one partition of a partitioned disk (nbdkit-partition-filter, qemu-nbd -P).

At start the filter reads the upstream's partition table and then serves partition `partition`
(counting from 1) as the whole export, like the `offset` filter with the partition's bounds.
Supported tables (512-byte sectors):
- MBR: primary partitions 1-4 and logical partitions 5, 6, ... inside an extended partition
  (types 0x05, 0x0f, 0x85; the chain of extended boot records is followed).
- GPT (a protective MBR with type 0xee): entries 1..N of the GPT partition array.
A missing table, an unused slot or a partition beyond the disk stops the node with a message
that says what the table does hold.

Params: `partition` (required, from 1). `relay` (default true): each client's requests and
replies relayed as bytes, as the `offset` kind's.

Example: `nbdfabric node partition partition=1 --upstream nbd+unix:///?socket=disk.sock`
"""

from __future__ import annotations

import struct

from ..base import Backend, read_flat
from ..params import Params, param
from ..registry import register
from .offset import Window, relay_param

SECTOR = 512
MBR_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, LBA start, sectors
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
EXTENDED_TYPES = (0x05, 0x0F, 0x85)
GPT_PROTECTIVE = 0xEE
#: Logical partitions followed before we call the chain a loop.
MAX_LOGICAL = 128


class PartitionParams(Params):
    partition: int = param(description="partition number to serve, from 1", ge=1)
    relay: bool = relay_param()


class PartitionError(ValueError):
    """The partition table is missing or broken, or has no such partition."""


@register
class Partition(Window):
    """Serves one partition (MBR primary or logical, or GPT) of the upstream disk."""

    kind = "partition"
    Params = PartitionParams
    params: PartitionParams

    def __init__(self, params: PartitionParams, next: Backend) -> None:
        super().__init__(params, next)
        self.table = ""

    def status(self) -> dict[str, object]:
        return {
            **self.next.status(),
            "table": self.table,
            "partition": self.params.partition,
            "start": self.start_at,
            "length": self.length,
        }

    async def _read(self, offset: int, count: int, disk_size: int) -> bytes:
        if offset + count > disk_size:
            raise PartitionError(
                f"partition: the partition table points past the end of the disk "
                f"(offset {offset}, disk {disk_size} bytes)"
            )
        buf = bytearray(count)
        await read_flat(self.next, memoryview(buf), offset)
        return bytes(buf)

    async def locate(self, upstream_size: int) -> tuple[int, int]:
        n = self.params.partition
        if upstream_size < SECTOR:
            raise PartitionError(f"partition: the disk ({upstream_size} bytes) has no MBR")
        mbr = await self._read(0, SECTOR, upstream_size)
        if mbr[510:512] != b"\x55\xaa":
            raise PartitionError("partition: no partition table (no MBR boot signature 55aa)")
        entries = [MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
        if any(e[2] == GPT_PROTECTIVE for e in entries):
            self.table = "gpt"
            start, length = await self._gpt(n, upstream_size)
        else:
            self.table = "mbr"
            start, length = await self._mbr(n, entries, upstream_size)
        if start + length > upstream_size:
            raise PartitionError(
                f"partition: partition {n} ({start}+{length}) runs past the end of the disk "
                f"({upstream_size} bytes)"
            )
        return start, length

    async def _mbr(
        self, n: int, entries: list[tuple[int, bytes, int, bytes, int, int]], disk: int
    ) -> tuple[int, int]:
        used = [i + 1 for i, e in enumerate(entries) if e[2] and e[5]]
        if n <= 4:
            _, _, ptype, _, lba, sectors = entries[n - 1]
            if not ptype or not sectors:
                raise PartitionError(
                    f"partition: MBR partition {n} is unused (used primaries: {used or 'none'})"
                )
            return lba * SECTOR, sectors * SECTOR
        extended = [e for e in entries if e[2] in EXTENDED_TYPES and e[5]]
        if not extended:
            raise PartitionError(
                f"partition: no partition {n}: the MBR has no extended partition, so there "
                f"are no logical partitions (used primaries: {used or 'none'})"
            )
        ext_start = extended[0][4]
        ebr_lba = ext_start
        seen = 0
        for number in range(5, 5 + MAX_LOGICAL):
            ebr = await self._read(ebr_lba * SECTOR, SECTOR, disk)
            if ebr[510:512] != b"\x55\xaa":
                raise PartitionError(f"partition: broken extended boot record at sector {ebr_lba}")
            first = MBR_ENTRY.unpack_from(ebr, 446)
            link = MBR_ENTRY.unpack_from(ebr, 446 + 16)
            if first[2] and first[5]:
                seen = number
                if number == n:
                    return (ebr_lba + first[4]) * SECTOR, first[5] * SECTOR
            if not link[2] or not link[5]:
                break
            ebr_lba = ext_start + link[4]
        last = f"5-{seen}" if seen else "none"
        raise PartitionError(f"partition: no logical partition {n} (logical partitions: {last})")

    async def _gpt(self, n: int, disk: int) -> tuple[int, int]:
        header = await self._read(SECTOR, GPT_HEADER.size, disk)
        fields = GPT_HEADER.unpack(header)
        signature, entries_lba, count, entry_size = fields[0], fields[10], fields[11], fields[12]
        if signature != b"EFI PART":
            raise PartitionError("partition: protective MBR but no GPT header at sector 1")
        if entry_size < 128 or count > 65536:
            raise PartitionError(f"partition: implausible GPT ({count} entries of {entry_size})")
        if n > count:
            raise PartitionError(f"partition: no partition {n}: the GPT has {count} entries")
        entry = await self._read(entries_lba * SECTOR + (n - 1) * entry_size, 128, disk)
        type_guid = entry[:16]
        first, last = struct.unpack_from("<QQ", entry, 32)
        if type_guid == bytes(16):
            raise PartitionError(f"partition: GPT partition {n} is unused")
        if last < first:
            raise PartitionError(f"partition: GPT partition {n} ends before it starts")
        return first * SECTOR, (last - first + 1) * SECTOR
