"""partitioning: a virtual partitioned disk made of files, one partition each
(nbdkit-partitioning-plugin).

The node makes up a partition table and lays each file out as one partition, in the order
given: a partition is the file's size rounded up to whole 512-byte sectors, and starts at the
next multiple of its `alignment` after what comes before it. The table is one of:
- `mbr`: an MBR in sector 0 with up to four primary partitions (the first marked active). With
  more than four files the first three are primaries, partition 4 is an extended partition
  (type 0x0f) from the end of the third to the end of the disk, and the files from the fourth
  on are logical partitions 5, 6, ..., each with its extended boot record in the sector right
  after the partition before it. The disk ends with the last partition.
- `gpt`: a protective MBR, the GPT header in sector 1 and the partition array after it (128
  entries of 128 bytes, or as many more multiples of 128 as the files need); after the last
  partition the backup array and the backup header in the disk's last sector. The first
  partition has the "legacy BIOS bootable" attribute; a partition's name is the file's name as
  given when it is ASCII and at most 35 characters, else empty.
By default it is `gpt` for more than four files or files of more than 2199018012160 bytes in
all (about 2 TB, what an MBR can address with room for its padding), else `mbr`.

Reads of the table are the table; of padding (between partitions, and after a file that is not
whole sectors), zeros. Writes inside a file reach the file, served as the `split` and `file`
plugins serve files (flush, FUA, trim, zero, extents, cache alike; see split). Writes to the
table or padding fail with EIO unless they leave the bytes as they are (zeros in padding), as in
nbdkit; the table cannot be changed. Extents: the table is data, padding is a hole.

Params:
- `file` (magic, given once per file, at least once): the files, in partition order. An empty
  file is refused (a partition cannot be empty).
- `partition-type` (mbr | gpt; any case): the table, as above.
- `alignment`, `mbr-id`, `type-guid`: settings of the files given after them (nbdkit's rule:
  `mbr-id=0x82 swap.img mbr-id=default root.img`), each `default` to go back to the default.
  `alignment`: a power of 2 from 512 to 1M (default 1M). `mbr-id`: the MBR partition type,
  0 to 255 (`0x82`; default 0x83, Linux). `type-guid`: the GPT partition type
  (`XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, or in braces; default the Linux file system type
  0FC63DAF-8483-4772-8E79-3D69D8477DE4). In a topology each is one value for every file or a
  list of one per file: `params: {file: [boot.img, swap.img], mbr-id: [0x83, 0x82]}`.

Differences from nbdkit 1.32's partitioning plugin, deliberate:
- GUIDs: nbdkit's disk GUID is all zeros and its partition GUIDs are random at every start;
  ours are made from the files' absolute paths (version 5), so a restarted node serves the
  same disk, and two disks made of different files differ.
- We offer trim (punching holes in the files) and answer extents (nbdkit: all data), and the
  capabilities of the split plugin above; a file we may not write makes the disk read-only.
- An `alignment` that is not a power of 2 is refused (nbdkit 1.32 aborts on an assertion);
  `alignment=default` is taken. An MBR whose partitions would start or end past 2^32 sectors
  (many partitions, each padded to its alignment, just below the size limit) is refused
  instead of being written wrong.
- Block devices may be partitions (nbdkit 1.32 takes one for an empty file, and refuses it).

Example: `nbdfabric node partitioning boot.img mbr-id=0x82 swap.img mbr-id=default root.img
--listen unix:/tmp/p.sock` serves a disk whose partitions 1, 2 and 3 are those files; the
`partition` filter (`partition=3`) over it serves root.img again.
"""

from __future__ import annotations

import os
import re
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, WithJsonSchema, field_validator, model_validator

from ..params import Many, Params, param, repeated
from ..registry import register
from ..values import c_integer, parse_size
from .file import File
from .split import FileLayout, Region

SECTOR = 512
DEFAULT_ALIGNMENT = 1 << 20
MAX_ALIGNMENT = 1 << 20
DEFAULT_MBR_ID = 0x83  #: Linux
DEFAULT_TYPE_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  #: Linux file system data
#: The largest total size of the files an MBR disk is made of (nbdkit's limit: 2^32 - 1
#: sectors less 5 MiB for the table and the padding).
MAX_MBR_DISK_SIZE = (0xFFFFFFFF * SECTOR) - 5 * 1024 * 1024
MBR_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, LBA start, sectors
#: "Beyond what CHS can say", in each CHS field (what nbdkit writes, and tools expect of LBA).
CHS_NONE = b"\xfe\xff\xff"
MBR_EXTENDED = 0x0F  #: extended partition, LBA
MBR_PROTECTIVE = 0xEE
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_HEADER_SIZE = 96  #: the size field (and the span of its CRC), as nbdkit writes it
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
GPT_ENTRIES_STEP = 128  #: the array holds a multiple of this many entries
GPT_NAME_MAX = 35  #: longer names (or not ASCII) are left empty, as nbdkit does
GPT_BIOS_BOOTABLE = 1 << 2
#: Where the disk and partition GUIDs are made from (uuid5 of the files' absolute paths).
GUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "nbdfabric.partitioning")
_GUID = re.compile(r"\{?([0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12})\}?")


def _each(value: Any) -> Any:
    """One value (a topology's scalar) as a list of one."""
    return value if isinstance(value, list) else [value]


def _is_default(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "default"


def _alignment(value: Any) -> int:
    if _is_default(value):
        return DEFAULT_ALIGNMENT
    n = parse_size(value)
    if not SECTOR <= n <= MAX_ALIGNMENT:
        raise ValueError(
            f"partition alignment {n} should be >= the sector size {SECTOR} and <= {MAX_ALIGNMENT}"
        )
    if n & (n - 1):
        raise ValueError(f"partition alignment {n} should be a power of 2 (512, 4K, ..., 1M)")
    return n


def _mbr_id(value: Any) -> int:
    if _is_default(value):
        return DEFAULT_MBR_ID
    n = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str):
        n = c_integer(value)
    if n is None or not 0 <= n <= 0xFF:
        raise ValueError("expected a type byte from 0 to 255 (0x00 to 0xff), or default")
    return n


def _type_guid(value: Any) -> str:
    if _is_default(value):
        return DEFAULT_TYPE_GUID
    m = _GUID.fullmatch(value) if isinstance(value, str) else None
    if m is None or value.startswith("{") != value.endswith("}"):
        raise ValueError(
            "expected a GUID like 0FC63DAF-8483-4772-8E79-3D69D8477DE4 (or in braces), or default"
        )
    return m.group(1).upper()


def _items(shown: str) -> WithJsonSchema:
    """The schema of a follower param (one value or a list); `kinds` shows its items as
    `shown`."""
    many = {"type": "array", "items": {"type": "string"}}
    return WithJsonSchema({"anyOf": [{"type": "string"}, many], "x-item": shown})


Alignments = Annotated[
    list[Annotated[int, BeforeValidator(_alignment)]], BeforeValidator(_each), _items("size")
]
MbrIds = Annotated[
    list[Annotated[int, BeforeValidator(_mbr_id)]], BeforeValidator(_each), _items("byte")
]
TypeGuids = Annotated[
    list[Annotated[str, BeforeValidator(_type_guid)]], BeforeValidator(_each), _items("guid")
]


class PartitioningParams(Params):
    file: Many = repeated(
        "a file holding one partition, in partition order (at least one)", path=True
    )
    partition_type: Literal["mbr", "gpt"] | None = param(
        None, description="the partition table (default: gpt for over 4 files or 2 TB, else mbr)"
    )
    alignment: Alignments = repeated(
        "alignment of the partitions of the files after it: a power of 2 from 512 to 1M "
        "(default 1M)",
        follows="file",
    )
    mbr_id: MbrIds = repeated(
        "MBR type byte of the partitions of the files after it (default 0x83)", follows="file"
    )
    type_guid: TypeGuids = repeated(
        f"GPT type GUID of the partitions of the files after it (default {DEFAULT_TYPE_GUID})",
        follows="file",
    )

    @field_validator("partition_type", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_per_file(self) -> PartitioningParams:
        if not self.file:
            raise ValueError("give at least one file=FILENAME (or bare file names)")
        n = len(self.file)
        for name, values in (("alignment", self.alignment), ("mbr-id", self.mbr_id),
                             ("type-guid", self.type_guid)):  # fmt: skip
            if len(values) not in (0, 1, n):
                raise ValueError(
                    f"{name} has {len(values)} values for {n} files: give one for every file, "
                    "or one for all"
                )
        return self

    def setting(self, values: list[Any], i: int, default: Any) -> Any:
        """File `i`'s value of a follower param (one for all, one per file, or none)."""
        if not values:
            return default
        return values[i] if len(values) > 1 else values[0]


def _align_up(sector: int, alignment: int) -> int:
    unit = alignment // SECTOR
    return -(-sector // unit) * unit


def _mbr_entry(status: int, ptype: int, start: int, sectors: int) -> bytes:
    if start > 0xFFFFFFFF or sectors > 0xFFFFFFFF:
        raise ValueError(
            f"partitioning: a partition at sector {start} of {sectors} sectors is past what an "
            "MBR can address (2^32 sectors); use partition-type=gpt"
        )
    return MBR_ENTRY.pack(status, CHS_NONE, ptype, CHS_NONE, start, sectors)


def _boot_record(entries: list[bytes]) -> bytes:
    return bytes(446) + b"".join(entries).ljust(64, b"\0") + b"\x55\xaa"


def _name(path: str) -> bytes:
    ok = path.isascii() and len(path) <= GPT_NAME_MAX
    return (path.encode("utf-16-le") if ok else b"").ljust(72, b"\0")


def _guid(*names: str) -> bytes:
    return uuid.uuid5(GUID_NAMESPACE, "\0".join(names)).bytes_le


@register
class Partitioning(FileLayout):
    """A virtual partitioned disk (MBR or GPT) whose partitions are files."""

    kind = "partitioning"
    Params = PartitioningParams
    magic = "file"
    params: PartitioningParams

    def __init__(self, params: PartitioningParams) -> None:
        super().__init__(params)
        self.table = ""  #: mbr | gpt, once laid out

    def paths(self) -> list[str]:
        return list(self.params.file)

    def status(self) -> dict[str, Any]:
        return {"table": self.table, **super().status()}

    def layout(self, sizes: list[int]) -> list[Region]:
        p = self.params
        for path, size in zip(p.file, sizes, strict=True):
            if not size:
                raise ValueError(f"{path}: zero length partitions are not allowed")
        total = sum(sizes)
        table = p.partition_type
        if table is None:
            table = "gpt" if len(sizes) > 4 or total > MAX_MBR_DISK_SIZE else "mbr"
        elif table == "mbr" and total > MAX_MBR_DISK_SIZE:
            raise ValueError(
                f"MBR partition table type supports a maximum virtual disk size of about 2 TB, "
                f"but you requested {len(sizes)} partition(s) and a total size of {total} "
                f"bytes (> {MAX_MBR_DISK_SIZE}). Try using: partition-type=gpt"
            )
        self.table = table
        sectors = [-(-size // SECTOR) for size in sizes]
        alignments = [p.setting(p.alignment, i, DEFAULT_ALIGNMENT) for i in range(len(sizes))]
        places = (
            self._gpt(sectors, alignments) if table == "gpt" else self._mbr(sectors, alignments)
        )
        return self._regions(places, sizes)

    def _mbr(self, sectors: list[int], alignments: list[int]) -> list[tuple[int, bytes | int]]:
        """(sector, table bytes | file index) of everything on an MBR disk, and its end."""
        p = self.params
        places: list[tuple[int, bytes | int]] = []
        entries: list[bytes] = []
        starts: list[int] = []
        pos = 1
        for i, (count, alignment) in enumerate(zip(sectors, alignments, strict=True)):
            logical = len(sectors) > 4 and i >= 3
            ebr = pos
            start = _align_up(pos + 1 if logical else pos, alignment)
            starts.append(start)
            places.append((start, i))
            pos = start + count
            if not logical:
                ptype = p.setting(p.mbr_id, i, DEFAULT_MBR_ID)
                entries.append(_mbr_entry(0x80 if i == 0 else 0, ptype, start, count))
            else:
                places.append((ebr, b""))  # filled in below, once the next one is placed
        end = pos
        if len(sectors) > 4:
            ext_start = starts[2] + sectors[2]
            entries.append(_mbr_entry(0, MBR_EXTENDED, ext_start, end - ext_start))
            ebrs = [(at, i) for i, (at, what) in enumerate(places) if what == b""]
            for k, (at, slot) in enumerate(ebrs):
                i = 3 + k
                ptype = p.setting(p.mbr_id, i, DEFAULT_MBR_ID)
                record = [_mbr_entry(0, ptype, starts[i] - at, sectors[i])]
                if k + 1 < len(ebrs):
                    after = ebrs[k + 1][0]
                    size = starts[i + 1] + sectors[i + 1] - after
                    record.append(_mbr_entry(0, MBR_EXTENDED, after - ext_start, size))
                places[slot] = (at, _boot_record(record))
        places.append((0, _boot_record(entries)))
        places.append((end, b""))  # the end of the disk
        return places

    def _gpt(self, sectors: list[int], alignments: list[int]) -> list[tuple[int, bytes | int]]:
        """(sector, table bytes | file index) of everything on a GPT disk, and its end."""
        p = self.params
        paths = [os.path.abspath(f) for f in p.file]
        partitions = [
            GptPartition(
                sectors=count,
                alignment=alignment,
                type_guid=p.setting(p.type_guid, i, DEFAULT_TYPE_GUID),
                guid=_guid("partition", str(i + 1), paths[i]),
                name=_name(p.file[i]),
                attributes=GPT_BIOS_BOOTABLE if i == 0 else 0,
            )
            for i, (count, alignment) in enumerate(zip(sectors, alignments, strict=True))
        ]
        return gpt_places(partitions, _guid("disk", *paths))

    def _regions(self, places: list[tuple[int, bytes | int]], sizes: list[int]) -> list[Region]:
        return regions_at(places, sizes, self.files)


def regions_at(
    places: list[tuple[int, bytes | int]], sizes: list[int], files: list[File]
) -> list[Region]:
    """A disk's regions from what is placed where, by sector (an int: that one of `files`,
    of `sizes[i]` bytes; bytes: a table; the last place, b"", is the disk's end): the gaps
    between are padding."""
    regions: list[Region] = []
    pos = 0
    for sector, what in sorted(places, key=lambda place: place[0]):
        at = sector * SECTOR
        if at > pos:
            regions.append(Region(pos, at - pos))
        if isinstance(what, int):
            regions.append(Region(at, sizes[what], files[what]))
            pos = at + sizes[what]
        elif what:
            regions.append(Region(at, len(what), fixed=what))
            pos = at + len(what)
    return regions


@dataclass(frozen=True)
class GptPartition:
    """One partition of a GPT disk, as gpt_places() lays it out."""

    sectors: int
    alignment: int  #: its start is the next multiple of this after what comes before it
    type_guid: str  #: XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX
    guid: bytes  #: its unique GUID, as stored (mixed endian)
    name: bytes  #: 72 bytes of UTF-16LE
    attributes: int = 0


def gpt_places(partitions: list[GptPartition], disk_guid: bytes) -> list[tuple[int, bytes | int]]:
    """(sector, table bytes | partition index) of everything on a GPT disk holding these
    partitions in order, and (last) its end: a protective MBR, the header in sector 1 and the
    partition array after it, the partitions, the backup array and header in the last sector."""
    slots = max(1, -(-len(partitions) // GPT_ENTRIES_STEP)) * GPT_ENTRIES_STEP
    array_sectors = slots * GPT_ENTRY.size // SECTOR
    first_usable = 2 + array_sectors
    places: list[tuple[int, bytes | int]] = []
    entries = []
    pos = first_usable
    for i, part in enumerate(partitions):
        start = _align_up(pos, part.alignment)
        places.append((start, i))
        pos = start + part.sectors
        entries.append(
            GPT_ENTRY.pack(
                uuid.UUID(part.type_guid).bytes_le,
                part.guid,
                start,
                pos - 1,
                part.attributes,
                part.name,
            )
        )
    array = b"".join(entries).ljust(slots * GPT_ENTRY.size, b"\0")
    last_usable, backup_array = pos - 1, pos
    last = backup_array + array_sectors

    def header(mine: int, other: int, array_at: int) -> bytes:
        fields = [b"EFI PART", 0x00010000, GPT_HEADER_SIZE, 0, 0, mine, other, first_usable,
                  last_usable, disk_guid, array_at, slots, GPT_ENTRY.size,
                  zlib.crc32(array)]  # fmt: skip
        blank = GPT_HEADER.pack(*fields).ljust(GPT_HEADER_SIZE, b"\0")
        fields[3] = zlib.crc32(blank)
        return GPT_HEADER.pack(*fields).ljust(SECTOR, b"\0")

    protective = _mbr_entry(0, MBR_PROTECTIVE, 1, min(last, 0xFFFFFFFF))
    places += [
        (0, _boot_record([protective])),
        (1, header(1, last, 2)),
        (2, array),
        (backup_array, array),
        (last, header(last, 1, backup_array)),
        (last + 1, b""),  # the end of the disk
    ]
    return places
