"""NBD protocol constants, grouped as the spec (NetworkBlockDevice/nbd doc/proto.md) groups them.

Every wire layout lives next to its magic as a `struct.Struct`; all integers are big-endian.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

#: Greeting magic, both styles ("NBDMAGIC").
NBDMAGIC = 0x4E42444D41474943
#: Newstyle greeting and option-request magic ("IHAVEOPT").
IHAVEOPT = 0x49484156454F5054
#: Option reply magic.
OPT_REPLY_MAGIC = 0x3E889045565A9
#: Compact request magic.
REQUEST_MAGIC = 0x25609513
#: Simple reply magic.
SIMPLE_REPLY_MAGIC = 0x67446698
#: Structured reply chunk magic.
STRUCTURED_REPLY_MAGIC = 0x668E33EF

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")  # type, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # type, min, preferred, max
OFFSET_HOLE = struct.Struct(">QI")  # offset, length
ERROR_HEAD = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, flags

#: Strings on the wire are at most this long (spec: MUST be <= 4096 bytes).
MAX_STRING = 4096


def wire_string(text: str, limit: int = MAX_STRING) -> bytes:
    """`text` as a string on the wire: UTF-8, at most `limit` bytes, cut at a character
    boundary (spec, Conventions: a string is UTF-8 and MUST be no longer than 4096 bytes; a
    character cut in two is not UTF-8). Unencodable characters (lone surrogates) become '?'."""
    raw = text.encode(errors="replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode(errors="ignore").encode()


#: nbdkit's guards, adopted: options per connection and bytes of one option's data.
MAX_OPTIONS = 32
MAX_OPTION_LENGTH = 64 * 1024 * 1024
#: Largest payload we accept unless a backend advertises less (qemu-nbd's choice, and
#: what conservative clients assume when nothing is advertised).
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
#: Descriptor cap per block-status chunk (spec SHOULD).
MAX_EXTENTS = 1 << 20
#: Descriptors we send in one block-status reply at most, far fewer: each costs the server work
#: and the reply 8 bytes, and 28 bytes of request must not buy a megabyte of reply. The spec
#: lets the answer describe less than asked; the client asks again from where it ends.
REPLY_EXTENTS = 4096


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0  #: server speaks fixed newstyle
    NO_ZEROES = 1 << 1  #: server can omit the 124 zero bytes after EXPORT_NAME


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  #: withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11  #: experimental branch; we answer ERR_UNSUP


REP_ERR = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERR | 1
    ERR_POLICY = REP_ERR | 2
    ERR_INVALID = REP_ERR | 3
    ERR_PLATFORM = REP_ERR | 4
    ERR_TLS_REQD = REP_ERR | 5
    ERR_UNKNOWN = REP_ERR | 6
    ERR_SHUTDOWN = REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = REP_ERR | 8
    ERR_TOO_BIG = REP_ERR | 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TFlag(IntFlag):
    """Transmission flags, sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


#: Which command each flag may accompany (FUA is accepted on any command when advertised).
FLAGS_VALID_FOR: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class Chunk(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Extent(IntFlag):
    """`base:allocation` flags."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class Err(IntEnum):
    """Error values on the wire (not the host's errno numbers)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


BASE_ALLOCATION = "base:allocation"
#: The context id we hand out for base:allocation (the only context we serve).
BASE_ALLOCATION_ID = 1
