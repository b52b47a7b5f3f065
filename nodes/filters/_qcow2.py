"""Where a qcow2 image's guest clusters lie in its file, and how to decode them (sans-IO).

The layout (qemu's docs/interop/qcow2.rst): the first cluster holds the header, version 2 (72
bytes) or 3 (`header_length` bytes), then header extensions. The guest disk is cut into
clusters; the L1 table (read whole at start) points to L2 tables, one cluster each, read when
first needed; an L2 entry says where one guest cluster is:
- unallocated (nothing stored; without a backing file it reads as zeros),
- all zeros (the v3 zero flag; a host cluster may be reserved but is never read),
- stored at a cluster-aligned offset of the file (a "standard" cluster), or
- compressed: a raw deflate stream (no zlib header) at any byte offset of the file, that
  many 512-byte sectors long, which inflates to one whole cluster.
With extended L2 entries (incompatible feature bit 4) an entry is two words: the second says,
for each of the cluster's 32 subclusters, whether it is allocated or reads as zeros.

Refcounts, snapshots and bitmaps do not matter to a reader of the active disk and are not read.

`open_image` is a generator, as the xz and tar walks are: it yields the (offset, length)
ranges it wants to read and is sent their bytes, and returns the Image (header facts and
the L1 table). `plan` turns a guest byte range and the L2 tables it needs into runs (holes,
zeros, file windows, compressed clusters); `inflate` decodes a compressed cluster.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple

MAGIC = b"QFI\xfb"
#: Version 2's whole header and the start of version 3's: magic, version, backing file offset
#: and length, cluster_bits, size, crypt_method, l1_size, l1_table_offset, refcount table
#: offset and clusters, nb_snapshots, snapshots_offset.
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
#: Version 3's fields after those: incompatible, compatible and autoclear feature bits,
#: refcount_order, header_length.
HEADER_V3 = struct.Struct(">QQQII")
V2_LENGTH = HEADER_V2.size  #: 72
V3_LENGTH = V2_LENGTH + HEADER_V3.size  #: 104
#: The compression_type byte (present when header_length is past it).
COMPRESSION_TYPE_AT = 104
EXTENSION = struct.Struct(">II")  #: type, length of its data (then padding to 8 bytes)
#: Feature name table entries: type (0 incompatible, 1 compatible, 2 autoclear), bit, name.
FEATURE_NAME = struct.Struct(">BB46s")

#: Cluster sizes served: 512 bytes (qcow2's least) to 2 MiB (qemu's limit, and the most it
#: writes); extended L2 entries need at least 16 KiB (subclusters of 512 bytes or more).
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS, MIN_EXTENDED_CLUSTER_BITS = 9, 21, 14
#: The largest L1 table read at start (qemu's limit too: 4 Mi entries).
MAX_L1_BYTES = 32 * 1024 * 1024
#: What the first read at start takes: the header and, in every image qemu writes, its
#: extensions. More of the first cluster is read only when an extension runs past it.
FIRST_READ = 4096
MAX_BACKING_NAME = 1023
SUBCLUSTERS = 32
SECTOR = 512

#: L1 and standard L2 entries: bits 9-55 are a host offset.
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COMPRESSED_FLAG = 1 << 62
#: "Refcount is exactly one": meaningless to a reader, except that with offset 0 it claims
#: the cluster is stored at the start of the file (only an external data file allows that).
COPIED_FLAG = 1 << 63
ZERO_FLAG = 1  #: version 3 standard entries without extended L2: the cluster reads as zeros
LOW_WORD = 0xFFFF_FFFF

#: (offset, length) of a range the walk wants to read.
Read = tuple[int, int]

if array("Q").itemsize != 8:  # pragma: no cover (every platform CPython runs on today)
    raise ImportError("array('Q') is not 64-bit here")


class Incompatible(IntFlag):
    """The header's incompatible feature bits: a reader must refuse any it does not know."""

    DIRTY = 1 << 0  #: refcounts may be stale (lazy refcounts, unclean shutdown)
    CORRUPT = 1 << 1  #: qemu found the metadata inconsistent
    DATA_FILE = 1 << 2  #: guest clusters are stored in another file
    COMPRESSION_TYPE = 1 << 3  #: compressed clusters use compression_type, not deflate
    EXTENDED_L2 = 1 << 4  #: L2 entries are two words, with subcluster bitmaps


class Extension(IntEnum):
    """Header extension types (an unknown one is skipped, as the spec allows)."""

    END = 0
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_NAMES = 0x6803F857
    BITMAPS = 0x23852875
    ENCRYPTION = 0x0537BE77
    DATA_FILE = 0x44415441


class Compression(IntEnum):
    DEFLATE = 0  #: qemu calls it "zlib"; raw deflate streams
    ZSTD = 1


class Kind(IntEnum):
    """What a run of the guest disk is."""

    HOLE = 0  #: unallocated: reads as zeros (no backing file)
    ZERO = 1  #: the zero flag (or zero subclusters): reads as zeros
    DATA = 2  #: stored as it is at `host` in the file
    COMPRESSED = 3  #: in the compressed cluster at `host`, `csize` bytes of the file


CRYPT_METHODS = {1: "AES", 2: "LUKS"}
FEATURE_TYPES = ("incompatible", "compatible", "autoclear")
#: Names for the incompatible bits, for messages (the image's feature name table wins).
KNOWN_NAMES = {
    Incompatible.DIRTY: "dirty bit",
    Incompatible.CORRUPT: "corrupt bit",
    Incompatible.DATA_FILE: "external data file",
    Incompatible.COMPRESSION_TYPE: "compression type",
    Incompatible.EXTENDED_L2: "extended L2 entries",
}
#: The bits this reader handles: dirty is served (see Image.dirty), compression type is
#: checked against the types it decodes.
#: A plain int: `~` of an IntFlag keeps only the bits the class names, so it would hide
#: the unknown ones.
HANDLED = int(Incompatible.DIRTY | Incompatible.COMPRESSION_TYPE | Incompatible.EXTENDED_L2)


class Qcow2Error(ValueError):
    """The image cannot be served: not qcow2, truncated, or using a feature this reader does
    not handle. The message says which and, where there is one, what to do."""


class BadMetadata(ValueError):
    """An L1 or L2 entry that cannot be right (past the end of the file, unaligned, or
    contradicting itself), found when a read needs it. `at` is the guest offset it maps."""

    def __init__(self, message: str, at: int) -> None:
        super().__init__(message)
        self.at = at


class BadCluster(ValueError):
    """A compressed cluster that does not inflate to one whole cluster."""


class Run(NamedTuple):
    """A run of the guest disk of one kind: [start, start + length)."""

    kind: Kind
    start: int
    length: int
    host: int = 0  #: file offset of the run's first byte (DATA); of the stream (COMPRESSED)
    csize: int = 0  #: COMPRESSED: the stream's bytes in the file, at most


@dataclass(frozen=True, slots=True)
class Image:
    """What a reader needs of an image: its geometry and its L1 table."""

    version: int
    size: int  #: the guest disk's bytes
    file_size: int  #: the qcow2 file's bytes (what the upstream holds)
    cluster_bits: int
    extended_l2: bool
    dirty: bool
    l1_offset: int
    l1: array[int]  #: array('Q') of the L1 entries, in host byte order
    header_length: int
    features: dict[str, list[str]]  #: feature names by type, as the image's table says

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def entry_words(self) -> int:
        return 2 if self.extended_l2 else 1

    @property
    def l2_entries(self) -> int:
        """Guest clusters one L2 table maps."""
        return self.cluster_size // (8 * self.entry_words)

    @property
    def table_span(self) -> int:
        """Guest bytes one L2 table maps."""
        return self.l2_entries << self.cluster_bits

    @property
    def unit(self) -> int:
        """The smallest piece of the guest disk that an entry describes by itself."""
        return self.cluster_size // SUBCLUSTERS if self.extended_l2 else self.cluster_size

    def l2_offset(self, index: int) -> int:
        """The file offset of L2 table `index` (0: none), or BadMetadata."""
        entry = self.l1[index] if index < len(self.l1) else 0
        offset = entry & OFFSET_MASK
        at = index * self.table_span
        if offset & (self.cluster_size - 1):
            raise BadMetadata(
                f"L1 entry {index} (guest offset {at}) points to file offset {offset}, "
                f"not a multiple of the cluster size {self.cluster_size}",
                at,
            )
        if offset and offset + self.cluster_size > self.file_size:
            raise BadMetadata(
                f"L1 entry {index} (guest offset {at}) points to an L2 table at file offset "
                f"{offset}, past the end of the file ({self.file_size} bytes)",
                at,
            )
        return offset

    def tables_for(self, start: int, length: int) -> list[int]:
        """The file offsets of the L2 tables mapping [start, start + length), without
        repeats; entries that are bad or empty are left out (plan() stops at a bad one)."""
        if length <= 0:
            return []
        offsets: dict[int, None] = {}
        for index in range(start // self.table_span, (start + length - 1) // self.table_span + 1):
            try:
                offset = self.l2_offset(index)
            except BadMetadata:
                continue
            if offset:
                offsets[offset] = None
        return list(offsets)


# The header ----------------------------------------------------------------------------------


def open_image(file_size: int) -> Generator[Read, bytes, Image]:
    """Read and check the header, its extensions and the L1 table of a qcow2 file of
    `file_size` bytes; Qcow2Error saying why the image cannot be served."""
    if file_size == 0:
        raise Qcow2Error("the upstream is empty, not a qcow2 image")
    head = yield (0, min(file_size, FIRST_READ))
    if len(head) < 4 or head[:4] != MAGIC:
        raise Qcow2Error(f"the upstream is not a qcow2 image (it starts with {head[:4]!r})")
    if len(head) < 8:
        raise Qcow2Error(f"the header is truncated: the file is {file_size} bytes")
    version = struct.unpack_from(">I", head, 4)[0]
    if version not in (2, 3):
        hint = " (qcow, the format before qcow2)" if version == 1 else ""
        raise Qcow2Error(f"qcow2 version {version}{hint} is not supported: only 2 and 3 are")
    least = V2_LENGTH if version == 2 else V3_LENGTH
    if len(head) < least:
        raise Qcow2Error(
            f"the header is truncated: a version {version} header is at least {least} bytes, "
            f"the file is {file_size}"
        )
    (_, _, backing_at, backing_len, cluster_bits, size, crypt, l1_size, l1_offset, *_) = (
        HEADER_V2.unpack_from(head)
    )
    incompatible, header_length = 0, V2_LENGTH
    if version == 3:
        incompatible, _, _, _, header_length = HEADER_V3.unpack_from(head, V2_LENGTH)
    _check_geometry(cluster_bits, version, header_length, file_size)
    cluster_size = 1 << cluster_bits
    if backing_at:
        name = yield from _backing_name(backing_at, backing_len, file_size)
        raise Qcow2Error(_backing_message(name, head, header_length))
    if crypt:
        method = CRYPT_METHODS.get(crypt, f"method {crypt}")
        raise Qcow2Error(
            f"the image is encrypted ({method}): this node does not decrypt; make a plain "
            "copy with `qemu-img convert --object secret,... --image-opts` first"
        )
    head = yield from _whole_extensions(head, header_length, min(cluster_size, file_size))
    extensions = parse_extensions(head, header_length, min(cluster_size, file_size))
    features = feature_names(extensions.get(Extension.FEATURE_NAMES, b""))
    _check_features(incompatible, features, extensions)
    _check_compression(head, header_length, incompatible)
    extended = bool(incompatible & Incompatible.EXTENDED_L2)
    if extended and cluster_bits < MIN_EXTENDED_CLUSTER_BITS:
        raise Qcow2Error(
            f"extended L2 entries with {cluster_size}-byte clusters: the format needs at least "
            f"{1 << MIN_EXTENDED_CLUSTER_BITS}"
        )
    l1_bytes = _check_l1(size, l1_size, l1_offset, cluster_bits, extended, file_size)
    l1 = array("Q")
    if l1_bytes:
        l1.frombytes((yield (l1_offset, l1_bytes)))
        if sys.byteorder == "little":
            l1.byteswap()
    named = {kind: [name for (t, _), name in features.items() if FEATURE_TYPES[t] == kind]
             for kind in FEATURE_TYPES}  # fmt: skip
    return Image(
        version=version,
        size=size,
        file_size=file_size,
        cluster_bits=cluster_bits,
        extended_l2=extended,
        dirty=bool(incompatible & Incompatible.DIRTY),
        l1_offset=l1_offset,
        l1=l1,
        header_length=header_length,
        features=named,
    )


def _check_geometry(cluster_bits: int, version: int, header_length: int, file_size: int) -> None:
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(
            f"cluster_bits is {cluster_bits}: clusters of 2^{MIN_CLUSTER_BITS} (512 bytes) to "
            f"2^{MAX_CLUSTER_BITS} (2 MiB) are served"
        )
    if version == 3 and (header_length < V3_LENGTH or header_length % 8):
        raise Qcow2Error(
            f"header_length is {header_length}: version 3 needs a multiple of 8, at least "
            f"{V3_LENGTH}"
        )
    if header_length > 1 << cluster_bits:
        raise Qcow2Error(
            f"header_length {header_length} is larger than a cluster ({1 << cluster_bits} bytes)"
        )
    if header_length > file_size:
        raise Qcow2Error(
            f"the header is truncated: it is {header_length} bytes, the file is {file_size}"
        )


def _backing_name(offset: int, length: int, file_size: int) -> Generator[Read, bytes, str]:
    if length > MAX_BACKING_NAME or offset + length > file_size:
        return "(unreadable: the header's backing file name is past the end or too long)"
    name = yield (offset, length)
    return name.decode("utf-8", "backslashreplace")


def _backing_message(name: str, head: bytes, header_length: int) -> str:
    fmt = ""
    try:  # the format is only for the message: a bad extension area does not hide the backing
        raw = parse_extensions(head, header_length, len(head)).get(Extension.BACKING_FORMAT)
        fmt = f" (format {raw.decode('utf-8', 'backslashreplace')})" if raw else ""
    except Qcow2Error:
        pass
    return (
        f"the image has a backing file {name!r}{fmt}: this node reads one image, and what the "
        "image does not hold would come from that file; flatten it first (`qemu-img convert "
        "-O qcow2 image.qcow2 flat.qcow2`), or serve the backing chain with qemu-nbd"
    )


def _whole_extensions(head: bytes, start: int, end: int) -> Generator[Read, bytes, bytes]:
    """`head` extended, as far as the extension area (up to `end`, the end of the first
    cluster) needs: read in one more request only for an image with large extensions."""
    pos = start
    while pos + EXTENSION.size <= end:
        if pos + EXTENSION.size > len(head):
            break
        kind, length = EXTENSION.unpack_from(head, pos)
        if kind == Extension.END:
            return head
        pos += EXTENSION.size + _round8(length)
    if len(head) >= end:
        return head
    return head + (yield (len(head), end - len(head)))


def parse_extensions(head: bytes, start: int, end: int) -> dict[int, bytes]:
    """The header extensions between `start` (header_length) and the end marker; the data of
    each by type (the last of a type wins; unknown types are kept, and ignored)."""
    found: dict[int, bytes] = {}
    pos = start
    while pos + EXTENSION.size <= min(end, len(head)):
        kind, length = EXTENSION.unpack_from(head, pos)
        if kind == Extension.END:
            return found
        data_at = pos + EXTENSION.size
        if data_at + length > end:
            raise Qcow2Error(
                f"the header extension of type {kind:#010x} at byte {pos} runs past the first "
                f"cluster ({end} bytes)"
            )
        found[kind] = head[data_at : data_at + length]
        pos = data_at + _round8(length)
    return found  # no end marker before the end of the cluster: qemu reads it so too


def feature_names(table: bytes) -> dict[tuple[int, int], str]:
    """The feature name table: a name per (type, bit)."""
    names = {}
    for at in range(0, len(table) - FEATURE_NAME.size + 1, FEATURE_NAME.size):
        kind, bit, raw = FEATURE_NAME.unpack_from(table, at)
        if kind < len(FEATURE_TYPES):
            names[(kind, bit)] = raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
    return names


def _check_features(
    incompatible: int, names: dict[tuple[int, int], str], extensions: dict[int, bytes]
) -> None:
    if incompatible & Incompatible.CORRUPT:
        raise Qcow2Error(
            "the image is marked corrupt (incompatible feature bit 1): qemu found its metadata "
            "inconsistent; repair it with `qemu-img check -r all` first"
        )
    if incompatible & Incompatible.DATA_FILE:
        raw = extensions.get(Extension.DATA_FILE, b"")
        name = repr(raw.decode("utf-8", "backslashreplace")) if raw else "(not named)"
        raise Qcow2Error(
            f"the image keeps its data in an external data file {name}: this node reads one "
            "file; make a self-contained copy with `qemu-img convert -O qcow2` first"
        )
    unknown = incompatible & ~HANDLED
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        shown = ", ".join(
            f"bit {b} ({names[(0, b)]})" if (0, b) in names else f"bit {b}" for b in bits
        )
        raise Qcow2Error(f"the image uses incompatible features this node does not know: {shown}")


def _check_compression(head: bytes, header_length: int, incompatible: int) -> None:
    kind = head[COMPRESSION_TYPE_AT] if header_length > COMPRESSION_TYPE_AT else 0
    flagged = bool(incompatible & Incompatible.COMPRESSION_TYPE)
    if flagged != (kind != Compression.DEFLATE):
        raise Qcow2Error(
            f"the header's compression type {kind} and its compression type feature bit "
            f"({'set' if flagged else 'clear'}) disagree"
        )
    if kind == Compression.ZSTD:
        raise Qcow2Error(
            "the image's compressed clusters use zstd, which this node does not decode (the "
            "zstandard module is not a dependency); recompress with `qemu-img convert -c -O "
            "qcow2 -o compression_type=zlib`, or without -c"
        )
    if kind != Compression.DEFLATE:
        raise Qcow2Error(f"the image uses compression type {kind}, which is unknown")


def _check_l1(
    size: int, l1_size: int, l1_offset: int, cluster_bits: int, extended: bool, file_size: int
) -> int:
    """The L1 table's length in bytes, once it is known to cover the disk and fit the file."""
    span = (1 << cluster_bits) // (16 if extended else 8) << cluster_bits
    needed = -(-size // span)
    l1_bytes = l1_size * 8
    if l1_bytes > MAX_L1_BYTES:
        raise Qcow2Error(
            f"the L1 table has {l1_size} entries, more than the {MAX_L1_BYTES // 8} read at start"
        )
    if l1_size < needed:
        raise Qcow2Error(
            f"the L1 table's {l1_size} entries map {l1_size * span} bytes, less than the "
            f"disk's {size}"
        )
    if l1_offset & ((1 << cluster_bits) - 1):
        raise Qcow2Error(f"the L1 table's offset {l1_offset} is not a multiple of the cluster size")
    if l1_bytes and l1_offset + l1_bytes > file_size:
        raise Qcow2Error(
            f"the image is truncated: its L1 table at offset {l1_offset} ({l1_bytes} bytes) "
            f"runs past the end of the file ({file_size} bytes)"
        )
    return l1_bytes


def _round8(n: int) -> int:
    return (n + 7) & ~7


# L2 tables and the runs of a guest range -------------------------------------------------------


def l2_table(data: bytes | bytearray | memoryview) -> array[int]:
    """An L2 table's entries (big-endian on disk) as host-order words."""
    table = array("Q")
    table.frombytes(data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def plan(
    image: Image,
    tables: Mapping[int, array[int]],
    start: int,
    length: int,
    runs: list[Run],
) -> None:
    """Append to `runs` what [start, start + length) of the guest disk is, in order, each run
    as long as it can be (neighbours of one kind merged, file windows while contiguous).
    `tables`: the L2 tables by file offset (Image.tables_for). BadMetadata at the first entry
    that cannot be right: the runs before it are in `runs`."""
    end = start + length
    span = image.table_span
    while start < end:
        index = start // span
        stop = min(end, (index + 1) * span)
        offset = image.l2_offset(index)
        if offset:
            _plan_table(image, tables[offset], start, stop, runs)
        else:
            _add(runs, Kind.HOLE, start, stop - start)
        start = stop


def _plan_table(image: Image, table: array[int], start: int, end: int, runs: list[Run]) -> None:
    bits, entries, words = image.cluster_bits, image.l2_entries, image.entry_words
    size = 1 << bits
    while start < end:
        cluster = start >> bits
        base = cluster << bits
        stop = min(end, base + size)
        i = (cluster % entries) * words
        if image.extended_l2:
            _plan_subclusters(image, table[i], table[i + 1], start, stop, base, runs)
        else:
            _plan_cluster(image, table[i], start, stop, base, runs)
        start = stop


def _plan_cluster(
    image: Image, entry: int, start: int, stop: int, base: int, runs: list[Run]
) -> None:
    """One cluster's [start, stop) by a standard (one-word) L2 entry."""
    if entry & COMPRESSED_FLAG:
        _add_compressed(image, entry, start, stop, base, runs)
    elif entry & ZERO_FLAG:
        if image.version < 3:
            raise BadMetadata(
                f"the L2 entry of the cluster at guest offset {base} has the zero flag, which "
                "a version 2 image does not have",
                base,
            )
        _add(runs, Kind.ZERO, start, stop - start)
    else:
        host = _host_cluster(image, entry, base)
        if host:
            _add_data(image, host + (start - base), start, stop - start, runs)
        else:
            _add(runs, Kind.HOLE, start, stop - start)


def _plan_subclusters(
    image: Image, entry: int, bitmap: int, start: int, stop: int, base: int, runs: list[Run]
) -> None:
    """One cluster's [start, stop) by an extended L2 entry: a kind per subcluster."""
    if entry & COMPRESSED_FLAG:  # no subclusters; its bitmap is reserved
        _add_compressed(image, entry, start, stop, base, runs)
        return
    allocated, zeros = bitmap & LOW_WORD, bitmap >> 32
    if allocated & zeros:
        raise BadMetadata(
            f"the L2 entry of the cluster at guest offset {base} has subclusters both "
            f"allocated and zero (bitmap {bitmap:#018x})",
            base,
        )
    host = _host_cluster(image, entry, base)
    if allocated and not host:
        raise BadMetadata(
            f"the L2 entry of the cluster at guest offset {base} has allocated subclusters "
            "and no host offset",
            base,
        )
    sub_bits = image.cluster_bits - 5
    while start < stop:
        sub = (start - base) >> sub_bits
        sub_stop = min(stop, base + ((sub + 1) << sub_bits))
        if allocated >> sub & 1:
            _add_data(image, host + (start - base), start, sub_stop - start, runs)
        else:
            _add(runs, Kind.ZERO if zeros >> sub & 1 else Kind.HOLE, start, sub_stop - start)
        start = sub_stop


def _host_cluster(image: Image, entry: int, base: int) -> int:
    """A standard entry's host cluster offset (0: none), checked to be a cluster's start."""
    host = entry & OFFSET_MASK
    if host & (image.cluster_size - 1):
        raise BadMetadata(
            f"the L2 entry of the cluster at guest offset {base} points to file offset {host}, "
            f"not a multiple of the cluster size {image.cluster_size}",
            base,
        )
    if not host and entry & COPIED_FLAG:
        raise BadMetadata(
            f"the L2 entry of the cluster at guest offset {base} points to file offset 0 (only "
            "an image with an external data file may)",
            base,
        )
    return host


def _add_data(image: Image, host: int, start: int, length: int, runs: list[Run]) -> None:
    if host + length > image.file_size:
        raise BadMetadata(
            f"the cluster at guest offset {start - start % image.cluster_size} is stored at file "
            f"offset {host - start % image.cluster_size}, past the end of the file "
            f"({image.file_size} bytes)",
            start,
        )
    last = runs[-1] if runs else None
    if (
        last is not None
        and last.kind is Kind.DATA
        and last.start + last.length == start
        and last.host + last.length == host
    ):
        runs[-1] = last._replace(length=last.length + length)
    else:
        runs.append(Run(Kind.DATA, start, length, host))


def _add_compressed(
    image: Image, entry: int, start: int, stop: int, base: int, runs: list[Run]
) -> None:
    host, csize = compressed_extent(entry, image.cluster_bits)
    if host >= image.file_size:
        raise BadMetadata(
            f"the compressed cluster at guest offset {base} is at file offset {host}, past the "
            f"end of the file ({image.file_size} bytes)",
            base,
        )
    # Its last sector may end past the end of the file (qemu does not pad the last one).
    runs.append(Run(Kind.COMPRESSED, start, stop - start, host, min(csize, image.file_size - host)))


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int]:
    """A compressed cluster descriptor: the stream's file offset, and its length at most
    (the sectors it touches, from the offset on)."""
    offset_bits = 62 - (cluster_bits - 8)
    host = entry & ((1 << offset_bits) - 1)
    sectors = (entry >> offset_bits) & ((1 << (cluster_bits - 8)) - 1)
    return host, (sectors + 1) * SECTOR - host % SECTOR


def _add(runs: list[Run], kind: Kind, start: int, length: int) -> None:
    last = runs[-1] if runs else None
    if last is not None and last.kind is kind and last.start + last.length == start:
        runs[-1] = last._replace(length=last.length + length)
    else:
        runs.append(Run(kind, start, length))


# Compressed clusters -------------------------------------------------------------------------


def inflate(data: bytes | bytearray | memoryview, cluster_size: int) -> bytes:
    """A compressed cluster's content: the raw deflate stream in `data` (which may go on past
    its end), inflated to exactly one cluster; never more is produced."""
    decoder = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = decoder.decompress(data, cluster_size)
    except zlib.error as exc:
        raise BadCluster(f"it does not inflate ({exc})") from None
    if len(out) < cluster_size:
        raise BadCluster(f"it inflates to {len(out)} bytes, not a whole cluster ({cluster_size})")
    return out
