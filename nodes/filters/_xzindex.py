"""Where an .xz file's blocks lie, read from its end, and how to decode one block alone (sans-IO).

An .xz file is one or more streams, with stream padding (zero bytes, a multiple of 4) between
or after them. Each stream ends with an index (one record per block: its unpadded and
uncompressed sizes) and a 12-byte footer saying how long the index is, so a reader can walk
back from the end of the file to its start and learn where every block lies without decoding
any (the .xz file format specification: https://tukaani.org/xz/xz-file-format.txt).

liblzma can decode a block only inside a stream (Python's lzma offers no block decoder). So one
block is decoded as a stream of its own: its stream's header, the block's bytes as they are, an
index of that one record and a footer. liblzma then checks everything it checks in a whole
file: the headers' CRC32s, the block's integrity check, and that the block's real sizes match
its record.

`find_streams` is a generator: it yields the (offset, length) ranges it wants to read and is
sent their bytes, so the walk is tested without I/O and driven by any reader.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass

HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
HEADER_SIZE = FOOTER_SIZE = 12
#: The smallest Unpadded Size liblzma accepts in an index record.
UNPADDED_MIN = 5
VLI_MAX = 2**63 - 1
VLI_BYTES_MAX = 9
#: The largest index read at start: its records become the block table held in memory (about
#: two million blocks, far more than any disk image compressed in 16 MiB blocks has).
INDEX_MAX = 16 * 1024 * 1024

#: Read size while walking back over a long run of stream padding.
PADDING_READ = 64 * 1024

#: (offset, length) of a range the walk wants to read.
Read = tuple[int, int]


class XzIndexError(ValueError):
    """The file cannot be read from its end as xz; the message says what is wrong."""


class BlockError(ValueError):
    """One block does not decode; the message is liblzma's, or says which size is wrong."""


@dataclass(frozen=True, slots=True)
class Record:
    """One index record: a block's size on disk without its padding, and its content's size."""

    unpadded: int
    uncompressed: int

    @property
    def on_disk(self) -> int:
        """Block padding makes every block a multiple of 4 bytes long."""
        return round_up4(self.unpadded)


@dataclass(frozen=True, slots=True)
class Footer:
    flags: bytes
    index_size: int


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One stream: where it starts in the file, its flags, and its blocks' records."""

    offset: int
    flags: bytes
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Block:
    """One block: where its content starts in the image and where its bytes are in the file."""

    start: int  #: offset of its content in the uncompressed image
    size: int  #: uncompressed bytes
    offset: int  #: file offset of the block's first byte
    unpadded: int  #: its record's Unpadded Size
    flags: bytes  #: its stream's flags (the integrity check type)

    @property
    def length(self) -> int:
        """Bytes on disk, block padding and check included."""
        return round_up4(self.unpadded)


def round_up4(n: int) -> int:
    return (n + 3) & ~3


# Parsing (pure functions over bytes) -------------------------------------------------------


def _crc32(data: bytes | memoryview) -> bytes:
    return struct.pack("<I", zlib.crc32(data))


def check_flags(flags: bytes) -> None:
    """Stream Flags: a zero byte, then the check type in the low nibble; the rest is reserved
    (a reader must refuse a stream that uses it: it may be a newer format)."""
    if flags[0] != 0 or flags[1] & 0xF0:
        raise XzIndexError(f"unsupported stream flags {flags.hex()}")


def parse_header(data: bytes) -> bytes:
    """A Stream Header: its Stream Flags."""
    if len(data) != HEADER_SIZE or data[:6] != HEADER_MAGIC:
        raise XzIndexError("no stream header where the index says the stream starts")
    flags = data[6:8]
    if _crc32(flags) != data[8:12]:
        raise XzIndexError("the stream header's CRC32 is wrong")
    check_flags(flags)
    return flags


def parse_footer(data: bytes) -> Footer:
    """A Stream Footer: its flags and the size of the index before it."""
    if len(data) != FOOTER_SIZE or data[10:12] != FOOTER_MAGIC:
        raise XzIndexError("no stream footer at the end")
    if _crc32(data[4:10]) != data[:4]:
        raise XzIndexError("the stream footer's CRC32 is wrong")
    flags = data[8:10]
    check_flags(flags)
    (backward_size,) = struct.unpack_from("<I", data, 4)
    return Footer(flags, (backward_size + 1) * 4)


def read_vli(data: bytes, pos: int) -> tuple[int, int]:
    """A variable-length integer at `pos` (7 bits a byte, low bits first, the high bit set
    on every byte but the last): its value and the position after it."""
    value = 0
    for i in range(VLI_BYTES_MAX):
        if pos + i >= len(data):
            raise XzIndexError("the index ends inside a number")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i:
                raise XzIndexError("a number in the index is not in its shortest form")
            return value, pos + i + 1
    raise XzIndexError("a number in the index is longer than 9 bytes")


def parse_index(data: bytes) -> tuple[Record, ...]:
    """An Index: indicator, record count, records, padding to 4 bytes, CRC32 of the rest."""
    if len(data) < 8 or len(data) % 4 or data[0] != 0:
        raise XzIndexError("no index where the stream footer says it is")
    count, pos = read_vli(data, 1)
    if count > (len(data) - pos) // 2:  # each record takes at least 2 bytes
        raise XzIndexError(f"the index claims {count} records, more than it can hold")
    records = []
    for _ in range(count):
        unpadded, pos = read_vli(data, pos)
        uncompressed, pos = read_vli(data, pos)
        if not UNPADDED_MIN <= unpadded <= VLI_MAX & ~3:
            raise XzIndexError(f"an index record gives an impossible block size {unpadded}")
        records.append(Record(unpadded, uncompressed))
    end = round_up4(pos)
    if end + 4 != len(data) or any(data[pos:end]):
        raise XzIndexError("the index's padding or size is wrong")
    if _crc32(data[:end]) != data[end:]:
        raise XzIndexError("the index's CRC32 is wrong")
    return tuple(records)


# The walk back from the end ----------------------------------------------------------------


def find_streams(size: int) -> Generator[Read, bytes, list[StreamInfo]]:
    """The streams of an .xz file of `size` bytes, first to last, found from its end.

    Yields each (offset, length) it must read and is sent those bytes. Three small reads a
    stream (footer, index, header), one more where there is stream padding."""
    if not size:
        raise XzIndexError("it is empty")
    if size % 4:
        raise XzIndexError("its size is not a multiple of 4")
    streams: list[StreamInfo] = []
    end = size
    while True:
        padding, before = yield from _padding_before(end)
        end -= padding
        if end < HEADER_SIZE + 8 + FOOTER_SIZE:
            raise XzIndexError(f"no stream ends at offset {end}")
        if len(before) < FOOTER_SIZE:
            before = yield (end - FOOTER_SIZE, FOOTER_SIZE)
        footer = parse_footer(before[-FOOTER_SIZE:])
        index_at = end - FOOTER_SIZE - footer.index_size
        if index_at < HEADER_SIZE:
            raise XzIndexError(
                f"a stream footer gives an impossible index size {footer.index_size}"
            )
        if footer.index_size > INDEX_MAX:
            raise XzIndexError(f"an index of {footer.index_size} bytes, more than {INDEX_MAX}")
        records = parse_index((yield (index_at, footer.index_size)))
        start = index_at - sum(r.on_disk for r in records) - HEADER_SIZE
        if start < 0:
            raise XzIndexError("the index's blocks do not fit before it")
        if parse_header((yield (start, HEADER_SIZE))) != footer.flags:
            raise XzIndexError("a stream's header and footer disagree")
        streams.append(StreamInfo(start, footer.flags, records))
        if start == 0:
            return streams[::-1]
        end = start


def _padding_before(end: int) -> Generator[Read, bytes, tuple[int, bytes]]:
    """How many zero bytes (stream padding) end at `end`, and the bytes read before them (a
    footer, most often). A stream footer ends with "YZ", so the zeros that end a range are
    padding and nothing else."""
    padding, want, before = 0, FOOTER_SIZE, b""
    while padding < end:
        n = min(want, end - padding)
        before = (yield (end - padding - n, n)).rstrip(b"\0")
        padding += n - len(before)
        if before:
            break
        want = PADDING_READ  # a long run of padding: read it in larger pieces
    if padding == end:
        raise XzIndexError("no stream, only zero bytes")
    if padding % 4:
        raise XzIndexError(f"stream padding of {padding} bytes, not a multiple of 4")
    return padding, before


def block_table(streams: Sequence[StreamInfo]) -> list[Block]:
    """Every block of every stream, in image order."""
    blocks = []
    start = 0
    for stream in streams:
        at = stream.offset + HEADER_SIZE
        for record in stream.records:
            blocks.append(Block(start, record.uncompressed, at, record.unpadded, stream.flags))
            start += record.uncompressed
            at += record.on_disk
    return blocks


# Decoding one block --------------------------------------------------------------------------


def encode_vli(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def stream_header(flags: bytes) -> bytes:
    return HEADER_MAGIC + flags + _crc32(flags)


def one_record_index(block: Block) -> bytes:
    body = b"\0" + encode_vli(1) + encode_vli(block.unpadded) + encode_vli(block.size)
    body += bytes(round_up4(len(body)) - len(body))
    return body + _crc32(body)


def stream_footer(flags: bytes, index_size: int) -> bytes:
    rest = struct.pack("<I", index_size // 4 - 1) + flags
    return _crc32(rest) + rest + FOOTER_MAGIC


def around_block(block: Block) -> tuple[bytes, bytes]:
    """What goes before and after a block's bytes to make a one-block stream of them."""
    index = one_record_index(block)
    return stream_header(block.flags), index + stream_footer(block.flags, len(index))


def decode_block(block: Block, data: bytes | memoryview) -> bytes:
    """The content of `block`, whose bytes on disk are `data`; BlockError if liblzma finds them
    corrupt or they hold more or less than the index says. liblzma is never asked for more
    than one byte past the recorded size, so a lying index cannot make it fill memory."""
    head, tail = around_block(block)
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    limit = block.size + 1
    try:
        decoder.decompress(head)
        out = decoder.decompress(data, limit)
        if len(out) < limit:
            rest = decoder.decompress(tail, limit - len(out))
            out = out + rest if rest else out
    except lzma.LZMAError as exc:
        raise BlockError(str(exc)) from None
    if len(out) > block.size:
        raise BlockError(f"it holds more than the {block.size} bytes its index record says")
    if len(out) < block.size:
        raise BlockError(f"it holds {len(out)} bytes, not the {block.size} its index record says")
    if not decoder.eof:
        raise BlockError("it does not end where its index record says")
    return out
