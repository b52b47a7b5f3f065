"""Where one member's data lies in a tar archive, found by walking its headers (sans-IO).

A tar archive is a run of 512-byte blocks: each member is a header block and then its data,
padded to whole blocks; a block of zeros ends the archive (two, says POSIX; GNU tar stops at
one). The formats differ in how a member says more than the header's fixed fields hold (the
layouts: GNU tar's manual, "Basic Tar Format", and POSIX.1-2001 `pax`):
- ustar: a name of up to 255 bytes as `prefix` "/" `name`; sizes in octal, below 8 GiB.
- GNU: a longer name in a member of type L (named ././@LongLink) just before, whose data is
  the name; sizes of 8 GiB and more in base-256 (the field's first byte has its high bit set).
- pax: a member of type x just before, whose data is records `LEN key=value\\n`; `path` and
  `size` replace the header's name and size. A type g member holds records for every later
  member; git archive writes one (the commit id), and none that matters here, so they are
  skipped unread.
Sparse members (GNU tar --sparse: type S, or pax records GNU.sparse.*) store their data
without its holes, so their content is not one byte range of the archive.

`find_entry` is a generator: it yields the (offset, length) ranges it wants to read and is
sent their bytes, so the walk is tested without I/O and driven by any reader. It reads the
headers only, skipping every member's data, and stops at the first member of the wanted name
(GNU tar's listing, which nbdkit's tar filter reads, stops there too).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

BLOCK = 512
#: The largest GNU long name or pax header read (a name is at most PATH_MAX, 4 KiB, on Linux;
#: pax records also carry ACLs and extended attributes, never megabytes of them).
EXTENDED_MAX = 8 * 1024 * 1024
#: Names listed in a "no such entry" message.
NAMES_SHOWN = 10

#: (offset, length) of a range the walk wants to read.
Read = tuple[int, int]

POSIX_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"
#: Members that describe the next member instead of being one.
LONG_NAME, LONG_LINK, PAX, PAX_SOLARIS, PAX_GLOBAL = b"L", b"K", b"x", b"X", b"g"
REGULAR = (b"0", b"\x00", b"7")  #: 7: contiguous file, a regular file everywhere but on Masscomp
HARD_LINK, SYMLINK, DIRECTORY, DUMPDIR = b"1", b"2", b"5", b"D"
GNU_SPARSE, MULTIVOLUME = b"S", b"M"
#: What the other types are, for messages.
KINDS = {b"3": "a character device", b"4": "a block device", b"6": "a FIFO", b"V": "a volume label"}
#: Types whose size field is not followed by data: GNU tar skips none for these two (and
#: resynchronises on what follows), and data for every other type, links and devices too.
NO_DATA = (HARD_LINK, DIRECTORY)
#: Old GNU sparse headers: "isextended" in the header, and in each extension block after it.
SPARSE_EXTENDED_AT, EXTENSION_EXTENDED_AT = 482, 504


class TarError(ValueError):
    """The archive cannot be walked (not tar, corrupt, truncated) or the member cannot be
    served; the message says which member and why."""


class BadHeader(ValueError):
    """A header block that is not one; the walk says where it was."""


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed fields of one header block that the walk uses."""

    name: bytes
    linkname: bytes
    size: int
    type: bytes
    format: str  #: "ustar" (POSIX magic), "gnu" (GNU magic) or "v7" (no magic)
    sparse_extended: bool  #: an old GNU sparse header with extension blocks after it


@dataclass(frozen=True, slots=True)
class Entry:
    """The member found: its data is [offset, offset + size) of the archive."""

    name: bytes
    header: int  #: offset of its first header block (a long name's or pax header's)
    offset: int
    size: int
    format: str  #: "ustar", "gnu", "pax" or "v7"


@dataclass
class _Extended:
    """What the long-name and pax members seen so far say about the next member."""

    start: int = -1  #: offset of the first of them, -1 while there is none
    long_name: bytes | None = None
    long_link: bytes | None = None
    pax: dict[bytes, bytes] = field(default_factory=dict)


def round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def show(name: bytes) -> str:
    """A member name for a message: quoted, as it reads; bytes that are not UTF-8 and
    characters that do not print (a newline) as escapes."""
    text = name.decode("utf-8", "backslashreplace")
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + "'"


# Parsing (pure functions over bytes) -------------------------------------------------------


def parse_number(data: bytes, what: str) -> int:
    """A numeric field: octal digits (leading spaces, ended by NUL or space), or base-256
    big-endian when the first byte's high bit is set (GNU tar and star, for sizes >= 8 GiB)."""
    if data[0] & 0x80:
        if data[0] & 0x40:  # 0xff: a negative number
            raise BadHeader(f"its {what} is negative")
        return int.from_bytes(bytes([data[0] & 0x7F]) + data[1:], "big")
    text = data.split(b"\0", 1)[0].strip(b" ")
    if text.strip(b"01234567"):
        raise BadHeader(f"its {what} field {data!r} is not an octal number")
    return int(text, 8) if text else 0


def checksum_ok(block: bytes) -> bool:
    """The header's sum of bytes, its checksum field counted as spaces: unsigned as POSIX
    says, or signed as some old tars summed it (tarfile and GNU tar accept both)."""
    try:
        stored = parse_number(block[148:156], "checksum")
    except BadHeader:
        return False
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * ord(" ")
    high = sum(1 for b in rest if b & 0x80)
    return stored in (unsigned, unsigned - 256 * high)


def _cstring(data: bytes) -> bytes:
    return data.split(b"\0", 1)[0]


def parse_header(block: bytes) -> Header:
    """One header block (not all zeros)."""
    if not checksum_ok(block):
        raise BadHeader("its checksum is wrong")
    magic = block[257:265]
    name = _cstring(block[:100])
    if magic == POSIX_MAGIC or magic[:6] == b"ustar\x00":
        fmt = "ustar"
        prefix = _cstring(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    else:
        fmt = "gnu" if magic == GNU_MAGIC else "v7"
    type_ = block[156:157]
    return Header(
        name=name,
        linkname=_cstring(block[157:257]),
        size=parse_number(block[124:136], "size"),
        type=type_,
        format=fmt,
        sparse_extended=type_ == GNU_SPARSE and fmt == "gnu" and block[SPARSE_EXTENDED_AT] != 0,
    )


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """pax records: `LEN key=value\\n`, LEN counting the whole record, itself included."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if not any(data[pos:]):  # zero padding after the last record (some writers add it)
            break
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        end = pos + int(digits) if digits.isdigit() else 0
        if end <= space or end > len(data) or data[end - 1 : end] != b"\n":
            raise BadHeader(f"its record at byte {pos} is malformed")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise BadHeader(f"its record at byte {pos} has no key=value")
        records[key] = value
        pos = end
    return records


def same_name(stored: bytes, wanted: bytes) -> bool:
    """GNU tar's match of a member to a name on its command line (nbdkit passes tar-entry so):
    exact, no wildcards, trailing slashes aside ("dir" names the member "dir/")."""
    return stored.rstrip(b"/") == wanted.rstrip(b"/")


# The walk -----------------------------------------------------------------------------------


def find_entry(wanted: bytes, size: int, limit: int = 0) -> Generator[Read, bytes, Entry]:
    """The first member named `wanted` in an archive of `size` bytes, if it is a regular file
    whose data lies inside the archive; else TarError saying why. With `limit`, no header
    starting at or past that offset is read."""
    if not size:
        raise TarError("the upstream is empty, not a tar archive")
    names: list[bytes] = []
    pos = 0
    ext = _Extended()
    while True:
        if limit and pos >= limit:
            raise TarError(_not_found(wanted, names, f"in the first {limit} bytes (tar-limit)"))
        if pos == size:  # GNU tar, too, takes an archive without its end blocks
            raise TarError(_not_found(wanted, names, "in the archive"))
        if size - pos < BLOCK:
            raise TarError(
                f"the archive is truncated: it ends {size - pos} bytes into a header block at "
                f"offset {pos}{_after(names)}"
            )
        block = yield (pos, BLOCK)
        if not any(block):
            if ext.start >= 0:
                raise TarError(
                    f"the archive is corrupt: the long name or pax header at offset "
                    f"{ext.start} describes no member (the archive ends after it)"
                )
            where = (
                "in the archive"
                if names
                else "(the archive is empty: it starts with a block of zeros)"
            )
            raise TarError(_not_found(wanted, names, where))
        header = _header(block, pos, names)
        if ext.start < 0:
            ext.start = pos
        if header.type in (LONG_NAME, LONG_LINK, PAX, PAX_SOLARIS, PAX_GLOBAL):
            after = pos + BLOCK + round_up(header.size)
            if after > size:
                raise TarError(
                    f"the archive is truncated: the long name or pax header at offset {pos} "
                    f"runs past the end of the archive ({size} bytes){_after(names)}"
                )
            if header.type != PAX_GLOBAL:
                data = yield from _extended_data(header, pos)
                _extend(ext, header.type, data, pos, names)
            elif ext.start == pos:
                ext.start = -1  # a global header describes no one member
            pos = after
            continue
        data_at = pos + BLOCK
        if header.sparse_extended:
            data_at = yield from _skip_sparse_extensions(data_at, size, names)
        name, member_size, fmt = _resolve(header, ext)
        if same_name(name, wanted):
            _check_servable(name, header, ext)
            if data_at + member_size > size:
                raise TarError(
                    f"the archive is truncated: entry {show(name)} has {member_size} bytes of "
                    f"data at offset {data_at}, past the end of the archive ({size} bytes)"
                )
            return Entry(name, ext.start, data_at, member_size, fmt)
        names.append(name)
        stored = 0 if header.type in NO_DATA else member_size
        pos = data_at + round_up(stored)
        if pos > size:
            raise TarError(
                f"the archive is truncated: entry {show(name)} at offset {ext.start} has "
                f"{stored} bytes of data, past the end of the archive ({size} bytes)"
            )
        ext = _Extended()


def _header(block: bytes, pos: int, names: list[bytes]) -> Header:
    try:
        return parse_header(block)
    except BadHeader as exc:
        if pos == 0:
            raise TarError(
                f"the upstream is not a tar archive: its first block is no tar header ({exc})"
            ) from None
        raise TarError(
            f"the archive is corrupt: the header block at offset {pos}{_after(names)}: {exc}"
        ) from None


def _extended_data(header: Header, pos: int) -> Generator[Read, bytes, bytes]:
    if header.size > EXTENDED_MAX:
        raise TarError(
            f"the archive is corrupt: the long name or pax header at offset {pos} claims "
            f"{header.size} bytes (at most {EXTENDED_MAX} are read)"
        )
    return (yield (pos + BLOCK, header.size)) if header.size else b""


def _extend(ext: _Extended, type_: bytes, data: bytes, pos: int, names: list[bytes]) -> None:
    if type_ == LONG_NAME:
        ext.long_name = _cstring(data)
    elif type_ == LONG_LINK:
        ext.long_link = _cstring(data)
    elif type_ in (PAX, PAX_SOLARIS):
        try:
            ext.pax.update(parse_pax(data))
        except BadHeader as exc:
            raise TarError(
                f"the archive is corrupt: the pax header at offset {pos}{_after(names)}: {exc}"
            ) from None


def _skip_sparse_extensions(at: int, size: int, names: list[bytes]) -> Generator[Read, bytes, int]:
    """Old GNU sparse headers continue in extension blocks before the data: where it starts."""
    while True:
        if at + BLOCK > size:
            raise TarError(f"the archive is truncated inside a sparse header at offset {at}")
        block = yield (at, BLOCK)
        at += BLOCK
        if not block[EXTENSION_EXTENDED_AT]:
            return at


def _resolve(header: Header, ext: _Extended) -> tuple[bytes, int, str]:
    """The member's name, size and format, the long name and pax records applied."""
    name = header.name if ext.long_name is None else ext.long_name
    size, fmt = header.size, header.format
    if ext.pax:
        fmt = "pax"
        name = ext.pax.get(b"path") or name
        name = ext.pax.get(b"GNU.sparse.name") or name  # the real name of a pax sparse file
        if b"size" in ext.pax:
            text = ext.pax[b"size"]
            if not text.isdigit():
                raise TarError(
                    f"the archive is corrupt: the pax header at offset {ext.start} has size "
                    f"{text!r}, not a number"
                )
            size = int(text)
    return name, size, fmt


def _check_servable(name: bytes, header: Header, ext: _Extended) -> None:
    """Only a regular file's data is the file: refuse the rest, saying what it is."""
    what = f"entry {show(name)}"
    target = show(ext.pax.get(b"linkpath") or ext.long_link or header.linkname)
    sparse = header.type == GNU_SPARSE or any(k.startswith(b"GNU.sparse.") for k in ext.pax)
    if sparse:
        raise TarError(
            f"{what} is a sparse file (tar --sparse): its data is stored without its holes, so "
            "it is not one byte range of the archive; unpack it, or make the archive without "
            "--sparse"
        )
    if header.type in (DIRECTORY, DUMPDIR) or (header.type in REGULAR and name.endswith(b"/")):
        raise TarError(f"{what} is a directory, not a file")
    if header.type == HARD_LINK:
        raise TarError(f"{what} is a hard link to {target}: name that entry instead")
    if header.type == SYMLINK:
        raise TarError(f"{what} is a symbolic link to {target}, not a file")
    if header.type == MULTIVOLUME:
        raise TarError(f"{what} continues a file from another volume of a multi-volume archive")
    if header.type not in REGULAR:
        kind = KINDS.get(header.type, f"of unknown type {header.type!r}")
        raise TarError(f"{what} is {kind}, not a regular file")


def _after(names: list[bytes]) -> str:
    return f" (after entry {show(names[-1])})" if names else ""


def _not_found(wanted: bytes, names: list[bytes], where: str) -> str:
    if not names:
        return f"no entry {show(wanted)} {where}"
    shown = ", ".join(show(n) for n in names[:NAMES_SHOWN])
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return f"no entry {show(wanted)} {where}; its entries: {shown}{more}"
