"""A small binding of libext2fs (e2fsprogs) with ctypes, for the ext2 filter.

libext2fs reads and writes its file system through an *I/O manager*: a table of C callbacks
(ext2_io.h's `struct struct_io_manager`). This module gives it one, written in Python, whose
callbacks read and write a `Device` (the ext2 filter's: its upstream, over NBD); on top of it,
`FileSystem` and `File` wrap the calls the filter needs (open, namei, read, write, flush,
close) and turn libext2fs's errcode_t into `Ext2Error`, an OSError with an errno.

The library is not thread-safe and neither is this module: every call, and so every callback,
must come from one thread (the filter's worker). Nothing is compiled: the structures are
declared here as ext2_io.h (e2fsprogs 1.47) lays them out; libext2fs-dev is not needed at run
time, only libext2fs2 (and libcom_err2, for error messages), which e2fsprogs depends on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import logging
import stat
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_char_p,
    c_int,
    c_long,
    c_uint,
    c_uint64,
    c_ulong,
    c_ulonglong,
    c_void_p,
)
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

log = logging.getLogger("nbdfabric.ext2")

errcode_t = c_long  # com_err.h: typedef long errcode_t

#: ext2_err.h (the error table's numbers are fixed by its order; EXT2_ET_BASE is its first).
EXT2_ET_BASE = 2133571328
EXT2_ET_MAGIC_IO_CHANNEL = EXT2_ET_BASE + 5
EXT2_ET_MAGIC_IO_MANAGER = EXT2_ET_BASE + 7
EXT2_ET_RO_FILSYS = 2133571349
EXT2_ET_SHORT_READ = 2133571364
EXT2_ET_SHORT_WRITE = 2133571365
EXT2_ET_DIR_NO_SPACE = 2133571366
EXT2_ET_NO_MEMORY = 2133571398
EXT2_ET_INVALID_ARGUMENT = 2133571399
EXT2_ET_BLOCK_ALLOC_FAIL = 2133571400
EXT2_ET_INODE_ALLOC_FAIL = 2133571401
EXT2_ET_NO_DIRECTORY = 2133571402
EXT2_ET_FILE_NOT_FOUND = 2133571404
EXT2_ET_FILE_RO = 2133571405
EXT2_ET_UNIMPLEMENTED = 2133571408
EXT2_ET_FILE_TOO_BIG = 2133571410
EXT2_ET_SYMLINK_LOOP = 2133571392
EXT2_ET_EXTENT_NO_SPACE = 2133571450
EXT2_ET_INODE_NOT_EXTENT = 2133571451
EXT2_ET_EXTENT_NO_NEXT = 2133571452
EXT2_ET_EA_NO_SPACE = 2133571491
EXT2_ET_INLINE_DATA_NO_SPACE = 2133571495

#: What a client is told for each: where no errno says it better, EIO (a damaged or
#: unreadable file system is an I/O error to whoever reads the file).
_ERRNO = {
    EXT2_ET_NO_MEMORY: errno.ENOMEM,
    EXT2_ET_RO_FILSYS: errno.EROFS,
    EXT2_ET_FILE_RO: errno.EROFS,
    EXT2_ET_BLOCK_ALLOC_FAIL: errno.ENOSPC,
    EXT2_ET_INODE_ALLOC_FAIL: errno.ENOSPC,
    EXT2_ET_DIR_NO_SPACE: errno.ENOSPC,
    EXT2_ET_EXTENT_NO_SPACE: errno.ENOSPC,
    EXT2_ET_EA_NO_SPACE: errno.ENOSPC,
    EXT2_ET_INLINE_DATA_NO_SPACE: errno.ENOSPC,
    EXT2_ET_FILE_TOO_BIG: errno.EFBIG,
    EXT2_ET_FILE_NOT_FOUND: errno.ENOENT,
    EXT2_ET_NO_DIRECTORY: errno.ENOTDIR,
    EXT2_ET_SYMLINK_LOOP: errno.ELOOP,
    EXT2_ET_INVALID_ARGUMENT: errno.EINVAL,
}

# ext2fs.h
EXT2_FLAG_RW = 0x01
EXT2_FLAG_64BITS = 0x20000
#: Multi-mount protection would have the library open the device by name itself (O_DIRECT)
#: and sleep for its interval: the device here is an NBD export this node alone writes.
EXT2_FLAG_SKIP_MMP = 0x100000
EXT2_FILE_WRITE = 0x0001
EXT2_ROOT_INO = 2
EXT2_SEEK_SET = 0
#: ext2fs_bmap2's ret_flags: the block is in an uninitialized extent (reads as zeros).
BMAP_RET_UNINIT = 0x0001
# NBD base:allocation flags, for File.map.
NBD_HOLE, NBD_ZERO = 1, 2
#: The most blocks one File.map looks up (a block status reply may cover less than asked).
MAP_BLOCKS = 4096
# ext2fs.h: ext2fs_extent_get's moves, and its extents' flags.
EXT2_EXTENT_ROOT = 0x0001
EXT2_EXTENT_NEXT_LEAF = 0x0007
EXT2_EXTENT_FLAGS_LEAF = 0x0001
EXT2_EXTENT_FLAGS_UNINIT = 0x0002
#: ext2_fs.h: i_flags (at 0x20 in the inode) bits: data in the inode itself, not in blocks.
EXT4_INLINE_DATA_FL = 0x10000000
# ext2_io.h
IO_FLAG_RW = 0x0001
#: The superblock, where the library reads it (and where we look for a journal to replay).
SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT2_SUPER_MAGIC = 0xEF53
EXT3_FEATURE_INCOMPAT_RECOVER = 0x0004
#: sizeof(struct ext2_inode) (ext2_fs.h): what ext2fs_read_inode fills.
INODE_SIZE = 128


class Run(NamedTuple):
    """`blocks` blocks of a file from logical block `first`: at physical block `physical` (0:
    none), with `flags` the NBD base:allocation flags they read as (File.mapping)."""

    first: int
    blocks: int
    physical: int
    flags: int


class ExtentStruct(Structure):
    """struct ext2fs_extent (ext2fs.h)."""

    _fields_ = [
        ("e_pblk", c_uint64),
        ("e_lblk", c_uint64),
        ("e_len", ctypes.c_uint32),
        ("e_flags", ctypes.c_uint32),
    ]


class Ext2Error(OSError):
    """A libext2fs call failed: `code` is its errcode_t, `errno` what a client is told."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(to_errno(code), f"{what}: {error_message(code)}")
        self.code = code


def to_errno(code: int) -> int:
    """errcode_t -> errno: the library passes errnos through as they are (small numbers)."""
    if 0 < code < 4096:
        return code
    return _ERRNO.get(code, errno.EIO)


class Device(Protocol):
    """What the file system lives on: `size` bytes, read and written at byte offsets. Errors
    are OSError (their errno is what libext2fs gets back)."""

    size: int
    writable: bool

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def zero(self, offset: int, length: int) -> None:
        """Write zeros (OSError ENOTSUP where the device cannot: the library then writes
        zero blocks itself)."""
        ...


# The library ----------------------------------------------------------------------------------


def _load(name: str, soname: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(soname)
    except OSError:
        found = ctypes.util.find_library(name)
        if found is None:
            raise OSError(
                errno.ENOENT, f"{soname} not found: install libext2fs2 (e2fsprogs)"
            ) from None
        return ctypes.CDLL(found)


_lib: ctypes.CDLL | None = None
_com_err: ctypes.CDLL | None = None


def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libext2fs and libcom_err, loaded (and prototyped) on first use."""
    global _lib, _com_err
    if _lib is not None and _com_err is not None:
        return _lib, _com_err
    lib = _load("ext2fs", "libext2fs.so.2")
    com_err = _load("com_err", "libcom_err.so.2")
    protos: dict[str, tuple[Any, ...]] = {
        "ext2fs_open2": (c_char_p, c_char_p, c_int, c_int, c_uint, c_void_p, POINTER(c_void_p)),
        "ext2fs_close2": (c_void_p, c_int),
        "ext2fs_flush": (c_void_p,),
        "ext2fs_read_bitmaps": (c_void_p,),
        "ext2fs_namei": (c_void_p, c_uint, c_uint, c_char_p, POINTER(c_uint)),
        "ext2fs_read_inode": (c_void_p, c_uint, c_void_p),
        "ext2fs_file_open2": (c_void_p, c_uint, c_void_p, c_int, POINTER(c_void_p)),
        "ext2fs_file_close": (c_void_p,),
        "ext2fs_file_flush": (c_void_p,),
        "ext2fs_file_llseek": (c_void_p, c_uint64, c_int, POINTER(c_uint64)),
        "ext2fs_file_read": (c_void_p, c_void_p, c_uint, POINTER(c_uint)),
        "ext2fs_file_write": (c_void_p, c_void_p, c_uint, POINTER(c_uint)),
        "ext2fs_file_get_lsize": (c_void_p, POINTER(c_uint64)),
        "ext2fs_extent_open2": (c_void_p, c_uint, c_void_p, POINTER(c_void_p)),
        "ext2fs_extent_get": (c_void_p, c_int, c_void_p),
        "ext2fs_bmap2": (
            c_void_p,
            c_uint,
            c_void_p,
            c_void_p,
            c_int,
            c_uint64,
            POINTER(c_int),
            POINTER(c_uint64),
        ),
    }
    for fn, argtypes in protos.items():
        f = getattr(lib, fn)
        f.argtypes, f.restype = list(argtypes), errcode_t
    lib.ext2fs_extent_free.argtypes, lib.ext2fs_extent_free.restype = [c_void_p], None
    lib.initialize_ext2_error_table.argtypes, lib.initialize_ext2_error_table.restype = [], None
    com_err.error_message.argtypes, com_err.error_message.restype = [errcode_t], c_char_p
    lib.initialize_ext2_error_table()  # error_message() then knows the library's codes
    _lib, _com_err = lib, com_err
    return lib, com_err


def error_message(code: int) -> str:
    _, com_err = _libs()
    text = com_err.error_message(code)
    return text.decode(errors="replace") if text else f"error {code}"


def _check(code: int, what: str) -> None:
    if code:
        raise Ext2Error(code, what)


# The I/O manager ------------------------------------------------------------------------------


class IoChannel(Structure):
    """struct struct_io_channel (ext2_io.h, 1.47)."""

    _fields_ = [
        ("magic", errcode_t),
        ("manager", c_void_p),
        ("name", c_void_p),
        ("block_size", c_int),
        ("read_error", c_void_p),
        ("write_error", c_void_p),
        ("refcount", c_int),
        ("flags", c_int),
        ("reserved", c_long * 14),
        ("private_data", c_void_p),
        ("app_data", c_void_p),
        ("align", c_int),
    ]


class IoStats(Structure):
    """struct struct_io_stats."""

    _fields_ = [
        ("num_fields", c_int),
        ("reserved", c_int),
        ("bytes_read", c_ulonglong),
        ("bytes_written", c_ulonglong),
    ]


_OPEN = CFUNCTYPE(errcode_t, c_char_p, c_int, POINTER(c_void_p))
_CHANNEL = CFUNCTYPE(errcode_t, c_void_p)  # close, flush
_SET_BLKSIZE = CFUNCTYPE(errcode_t, c_void_p, c_int)
_BLK = CFUNCTYPE(errcode_t, c_void_p, c_ulong, c_int, c_void_p)  # read_blk, write_blk, write_byte
_SET_OPTION = CFUNCTYPE(errcode_t, c_void_p, c_char_p, c_char_p)
_GET_STATS = CFUNCTYPE(errcode_t, c_void_p, POINTER(c_void_p))
_BLK64 = CFUNCTYPE(errcode_t, c_void_p, c_ulonglong, c_int, c_void_p)
_RANGE64 = CFUNCTYPE(errcode_t, c_void_p, c_ulonglong, c_ulonglong)  # discard, readahead, zeroout


class IoManager(Structure):
    """struct struct_io_manager (ext2_io.h, 1.47): the callbacks in the header's order."""

    _fields_ = [
        ("magic", errcode_t),
        ("name", c_char_p),
        ("open", _OPEN),
        ("close", _CHANNEL),
        ("set_blksize", _SET_BLKSIZE),
        ("read_blk", _BLK),
        ("write_blk", _BLK),
        ("flush", _CHANNEL),
        ("write_byte", _BLK),
        ("set_option", _SET_OPTION),
        ("get_stats", _GET_STATS),
        ("read_blk64", _BLK64),
        ("write_blk64", _BLK64),
        ("discard", _RANGE64),
        ("cache_readahead", _RANGE64),
        ("zeroout", _RANGE64),
        ("reserved", c_long * 14),
    ]


@dataclass
class _Channel:
    """An open channel: the C struct the library holds a pointer to, and its device."""

    struct: IoChannel
    device: Device
    name: ctypes.Array[ctypes.c_char]
    stats: IoStats
    writable: bool


#: Devices waiting for ext2fs_open2 to open them, by the name it is given for them.
_pending: dict[bytes, Device] = {}
#: Open channels, by the address of their struct.
_channels: dict[int, _Channel] = {}
_names = itertools.count(1)


def _errcode(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    log.error("ext2: I/O manager callback failed: %r", exc)
    return errno.EIO


def _callback(fn: Any) -> Any:
    """A callback that never lets an exception reach ctypes (which would print it and return
    0: success, with the buffer unfilled): OSError becomes its errno, anything else EIO."""

    def guarded(*args: Any) -> int:
        try:
            return int(fn(*args))
        except BaseException as exc:  # C is calling: there is nowhere to raise to
            return _errcode(exc)

    guarded.__name__ = fn.__name__
    return guarded


def _span(ch: _Channel, block: int, count: int) -> tuple[int, int]:
    """(offset, length) of `count` blocks at `block`; a negative count is a byte count."""
    size = ch.struct.block_size
    return block * size, (count * size if count >= 0 else -count)


def _open(name: bytes, flags: int, ret: Any) -> int:
    device = _pending.pop(name, None)
    if device is None:
        return EXT2_ET_INVALID_ARGUMENT
    writable = bool(flags & IO_FLAG_RW)
    if writable and not device.writable:
        return errno.EROFS
    stats = IoStats(num_fields=2)
    name_buf = ctypes.create_string_buffer(name)
    struct = IoChannel(
        magic=EXT2_ET_MAGIC_IO_CHANNEL,
        manager=ctypes.addressof(MANAGER),
        name=ctypes.addressof(name_buf),
        block_size=1024,
        refcount=1,
    )
    _channels[ctypes.addressof(struct)] = _Channel(struct, device, name_buf, stats, writable)
    ret[0] = ctypes.addressof(struct)
    return 0


def _close(channel: int) -> int:
    ch = _channels[channel]
    ch.struct.refcount -= 1
    if ch.struct.refcount <= 0:
        del _channels[channel]  # the struct goes with it: the library holds no other copy
    return 0


def _set_blksize(channel: int, blksize: int) -> int:
    if blksize <= 0:
        return EXT2_ET_INVALID_ARGUMENT
    _channels[channel].struct.block_size = blksize
    return 0


def _read(ch: _Channel, offset: int, length: int, data: int) -> int:
    device = ch.device
    if length <= 0:
        return 0
    n = max(0, min(length, device.size - offset))
    if n:
        got = device.pread(offset, n)
        ctypes.memmove(data, got, n)
        ch.stats.bytes_read += n
    if n < length:  # past the end (a damaged superblock's block count): zeros, and an error
        ctypes.memset(data + n, 0, length - n)
        return EXT2_ET_SHORT_READ
    return 0


def _write(ch: _Channel, offset: int, length: int, data: int) -> int:
    if not ch.writable:
        return EXT2_ET_RO_FILSYS
    if length <= 0:
        return 0
    if offset + length > ch.device.size:
        return EXT2_ET_SHORT_WRITE  # nothing written: not a part of it either
    ch.device.pwrite(offset, ctypes.string_at(data, length))
    ch.stats.bytes_written += length
    return 0


def _read_blk(channel: int, block: int, count: int, data: int) -> int:
    ch = _channels[channel]
    return _read(ch, *_span(ch, block, count), data)


def _write_blk(channel: int, block: int, count: int, data: int) -> int:
    ch = _channels[channel]
    return _write(ch, *_span(ch, block, count), data)


def _write_byte(channel: int, offset: int, count: int, data: int) -> int:
    return _write(_channels[channel], offset, count, data)


def _flush(channel: int) -> int:
    ch = _channels[channel]
    if ch.writable:
        ch.device.flush()
    return 0


def _set_option(channel: int, option: bytes, arg: bytes | None) -> int:
    return EXT2_ET_INVALID_ARGUMENT  # no options (unix_io's "cache" and "offset" make no sense)


def _get_stats(channel: int, ret: Any) -> int:
    if ret:
        ret[0] = ctypes.addressof(_channels[channel].stats)
    return 0


def _discard(channel: int, block: int, count: int) -> int:
    return EXT2_ET_UNIMPLEMENTED  # the library's discards are advice; an upstream may keep data


def _cache_readahead(channel: int, block: int, count: int) -> int:
    return 0  # a hint; the upstream is read when the blocks are asked for


def _zeroout(channel: int, block: int, count: int) -> int:
    ch = _channels[channel]
    if not ch.writable:
        return EXT2_ET_RO_FILSYS
    size = ch.struct.block_size
    offset, length = block * size, count * size
    if offset + length > ch.device.size:
        return EXT2_ET_SHORT_WRITE
    try:
        ch.device.zero(offset, length)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return EXT2_ET_UNIMPLEMENTED  # the library writes zero blocks instead
        raise
    return 0


MANAGER = IoManager(
    magic=EXT2_ET_MAGIC_IO_MANAGER,
    name=b"nbdfabric",
    open=_OPEN(_callback(_open)),
    close=_CHANNEL(_callback(_close)),
    set_blksize=_SET_BLKSIZE(_callback(_set_blksize)),
    read_blk=_BLK(_callback(_read_blk)),
    write_blk=_BLK(_callback(_write_blk)),
    flush=_CHANNEL(_callback(_flush)),
    write_byte=_BLK(_callback(_write_byte)),
    set_option=_SET_OPTION(_callback(_set_option)),
    get_stats=_GET_STATS(_callback(_get_stats)),
    read_blk64=_BLK64(_callback(_read_blk)),
    write_blk64=_BLK64(_callback(_write_blk)),
    discard=_RANGE64(_callback(_discard)),
    cache_readahead=_RANGE64(_callback(_cache_readahead)),
    zeroout=_RANGE64(_callback(_zeroout)),
)


# The file system -------------------------------------------------------------------------------


def check_superblock(device: Device) -> bytes:
    """Refuse, before the library opens it, a file system it would serve wrong: one whose
    journal needs replaying (the library does not replay it; its files would read stale
    and writes land under what the replay then writes back). Other damage is the library's
    to find. Returns the superblock it read."""
    if device.size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE:
        raise Ext2Error(EXT2_ET_SHORT_READ, "open")
    sb = device.pread(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE)
    magic = int.from_bytes(sb[0x38:0x3A], "little")
    incompat = int.from_bytes(sb[0x60:0x64], "little")
    if magic == EXT2_SUPER_MAGIC and incompat & EXT3_FEATURE_INCOMPAT_RECOVER:
        raise OSError(
            errno.EIO,
            "the file system's journal needs recovery (it was not cleanly unmounted): "
            "run e2fsck on it first",
        )
    return sb


class FileSystem:
    """An ext2/3/4 file system on `device`, opened with libext2fs (read-write if `writable`).
    Use it from one thread only; close() it (a context manager closes it too)."""

    def __init__(self, device: Device, writable: bool) -> None:
        lib, _ = _libs()
        self.lib = lib
        self.writable = writable
        self._bitmaps = False
        self.files: set[File] = set()
        superblock = check_superblock(device)
        name = f"nbdfabric-ext2-{next(_names)}".encode()
        flags = EXT2_FLAG_64BITS | EXT2_FLAG_SKIP_MMP | (EXT2_FLAG_RW if writable else 0)
        fs = c_void_p()
        _pending[name] = device
        try:
            _check(lib.ext2fs_open2(name, None, flags, 0, 0, byref(MANAGER), byref(fs)), "open")
        finally:
            _pending.pop(name, None)
        self.fs: int | None = fs.value
        #: Bytes a block (s_log_block_size: 1024 << it), for mapping a file's blocks.
        self.block_size = 1024 << int.from_bytes(superblock[24:28], "little")

    def __enter__(self) -> FileSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self) -> int:
        if self.fs is None:
            raise OSError(errno.EBADF, "the file system is closed")
        return self.fs

    def lookup(self, path: str) -> int:
        """The inode number of `path` (absolute, or from the root); intermediate symlinks are
        followed, a last one is not (ext2fs_namei)."""
        name = path.encode(errors="surrogateescape")  # an export name's bytes, as sent
        if b"\0" in name:
            raise OSError(errno.ENOENT, f"{path!r}: no file name holds a NUL byte")
        ino = c_uint()
        code = self.lib.ext2fs_namei(self._handle(), EXT2_ROOT_INO, EXT2_ROOT_INO, name, byref(ino))
        _check(code, f"{path}: namei")
        return ino.value

    def _inode(self, ino: int) -> bytes:
        buf = ctypes.create_string_buffer(INODE_SIZE)
        _check(self.lib.ext2fs_read_inode(self._handle(), ino, buf), f"inode {ino}")
        return buf.raw

    def mode(self, ino: int) -> int:
        """The inode's i_mode (stat.S_ISREG and the like read it)."""
        return int.from_bytes(self._inode(ino)[:2], "little")

    def inode_flags(self, ino: int) -> int:
        """The inode's i_flags (EXT4_INLINE_DATA_FL and the like)."""
        return int.from_bytes(self._inode(ino)[0x20:0x24], "little")

    def open_regular(self, path: str) -> File:
        """The regular file at `path`, opened (for writing if the file system is writable).
        OSError ENOENT if there is none, EISDIR/EINVAL if it is not a regular file."""
        ino = self.lookup(path)
        mode = self.mode(ino)
        if not stat.S_ISREG(mode):
            code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
            raise OSError(code, f"{path}: must be a regular file in the file system")
        return self.open_file(ino)

    def open_file(self, ino: int) -> File:
        handle = c_void_p()
        flags = EXT2_FILE_WRITE if self.writable else 0
        _check(
            self.lib.ext2fs_file_open2(self._handle(), ino, None, flags, byref(handle)),
            f"inode {ino}: open",
        )
        file = File(self, ino, handle.value)
        self.files.add(file)
        return file

    def load_bitmaps(self) -> None:
        """Read the block and inode bitmaps, once (allocating blocks needs them)."""
        if not self._bitmaps:
            _check(self.lib.ext2fs_read_bitmaps(self._handle()), "reading the bitmaps")
            self._bitmaps = True

    def flush(self) -> None:
        """Write every open file's buffer, then the superblock, group descriptors and
        bitmaps, and flush the device (ext2fs_flush)."""
        for file in list(self.files):
            file.flush()
        if self.writable:
            _check(self.lib.ext2fs_flush(self._handle()), "flush")

    def close(self) -> None:
        """Close the open files and the file system (writing what changed). Idempotent."""
        if self.fs is None:
            return
        errors = []
        for file in list(self.files):
            try:
                file.close()
            except OSError as exc:
                errors.append(exc)
        fs, self.fs = self.fs, None
        code = self.lib.ext2fs_close2(fs, 0)  # frees the handle even when it fails
        if code:
            errors.append(Ext2Error(code, "close"))
        if errors:
            raise errors[0]


class File:
    """An open regular file of a FileSystem."""

    def __init__(self, fs: FileSystem, ino: int, handle: int | None) -> None:
        self.fs, self.ino, self.handle = fs, ino, handle
        self.lib = fs.lib
        #: Set by whoever writes the file's blocks behind the library's back: the one block
        #: the handle buffers may then be older than the device (pwrite reopens first).
        self.stale = False

    @property
    def inline(self) -> bool:
        """Whether the file's data is in its inode (no blocks to map)."""
        return bool(self.fs.inode_flags(self.ino) & EXT4_INLINE_DATA_FL)

    def _h(self) -> int:
        if self.handle is None:
            raise OSError(errno.EBADF, f"inode {self.ino} is closed")
        return self.handle

    @property
    def size(self) -> int:
        size = c_uint64()
        _check(self.lib.ext2fs_file_get_lsize(self._h(), byref(size)), "size")
        return size.value

    def _seek(self, offset: int) -> None:
        _check(self.lib.ext2fs_file_llseek(self._h(), offset, EXT2_SEEK_SET, None), "seek")

    def map(self, offset: int, length: int, most_blocks: int = MAP_BLOCKS) -> list[tuple[int, int]]:
        """base:allocation extents of `length` bytes at `offset` (within the file), as (length,
        NBD flags) runs: a block the file has no block for is a hole that reads as zeros (3),
        an allocated but unwritten one (an uninit extent: fallocate) reads as zeros (2), any
        other is data (0). At most `most_blocks` blocks are looked up: the runs may end
        early, as a block status reply may."""
        bs = self.fs.block_size
        fs = self.fs._handle()
        first, last = offset // bs, (offset + length - 1) // bs
        last = min(last, first + most_blocks - 1)
        runs: list[list[int]] = []
        ret, phys = c_int(), c_uint64()
        for block in range(first, last + 1):
            ret.value = 0
            _check(
                self.lib.ext2fs_bmap2(fs, self.ino, None, None, 0, block, byref(ret), byref(phys)),
                f"inode {self.ino}: block {block}",
            )
            if not phys.value:
                kind = NBD_HOLE | NBD_ZERO
            else:
                kind = NBD_ZERO if ret.value & BMAP_RET_UNINIT else 0
            start = max(block * bs, offset)
            end = min((block + 1) * bs, offset + length)
            if runs and runs[-1][1] == kind:
                runs[-1][0] += end - start
            else:
                runs.append([end - start, kind])
        return [(n, kind) for n, kind in runs]

    def mapping(self, first: int, count: int) -> list[Run]:
        """Where blocks `first` to `first + count` (exclusive) of the file are, as contiguous
        runs covering them all, physically contiguous blocks of one kind in one run: a hole
        (no block: physical 0, NBD_HOLE | NBD_ZERO), an uninitialized extent (reads as zeros:
        NBD_ZERO) or data (0). Extent-mapped files walk their extent tree's leaves; others
        (ext2/ext3's block maps) look each block up."""
        runs: list[Run] = []
        end = first + count

        def add(lblk: int, n: int, pblk: int, flags: int) -> None:
            lo, hi = max(lblk, first), min(lblk + n, end)
            if lo >= hi:
                return
            pblk = pblk + lo - lblk if pblk else 0
            at = runs[-1].first + runs[-1].blocks if runs else first
            if lo > at:
                add(at, lo - at, 0, NBD_HOLE | NBD_ZERO)
            if runs:
                last = runs[-1]
                follows = (
                    (pblk == 0) if last.physical == 0 else (pblk == last.physical + last.blocks)
                )
                if last.flags == flags and follows:
                    runs[-1] = last._replace(blocks=last.blocks + hi - lo)
                    return
            runs.append(Run(lo, hi - lo, pblk, flags))

        fs = self.fs._handle()
        handle = c_void_p()
        code = self.lib.ext2fs_extent_open2(fs, self.ino, None, byref(handle))
        if code == EXT2_ET_INODE_NOT_EXTENT:
            ret, phys = c_int(), c_uint64()
            for block in range(first, end):
                ret.value = 0
                code = self.lib.ext2fs_bmap2(fs, self.ino, None, None, 0, block, byref(ret),
                                             byref(phys))  # fmt: skip
                _check(code, f"inode {self.ino}: block {block}")
                if phys.value:
                    add(block, 1, phys.value, NBD_ZERO if ret.value & BMAP_RET_UNINIT else 0)
        else:
            _check(code, f"inode {self.ino}: extents")
            try:
                extent, op = ExtentStruct(), EXT2_EXTENT_ROOT
                while True:
                    code = self.lib.ext2fs_extent_get(handle, op, byref(extent))
                    if code == EXT2_ET_EXTENT_NO_NEXT:
                        break
                    _check(code, f"inode {self.ino}: extents")
                    op = EXT2_EXTENT_NEXT_LEAF
                    if not extent.e_flags & EXT2_EXTENT_FLAGS_LEAF:
                        continue  # the root of a deeper tree: its first leaf comes next
                    if extent.e_lblk >= end:
                        break
                    uninit = extent.e_flags & EXT2_EXTENT_FLAGS_UNINIT
                    add(extent.e_lblk, extent.e_len, extent.e_pblk, NBD_ZERO if uninit else 0)
            finally:
                self.lib.ext2fs_extent_free(handle)
        at = runs[-1].first + runs[-1].blocks if runs else first
        if at < end:
            runs.append(Run(at, end - at, 0, NBD_HOLE | NBD_ZERO))
        return runs

    def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (holes read as zeros; past the end, none)."""
        buf = ctypes.create_string_buffer(length)
        self._seek(offset)
        got, done = c_uint(), 0
        while done < length:
            code = self.lib.ext2fs_file_read(
                self._h(), ctypes.addressof(buf) + done, length - done, byref(got)
            )
            _check(code, f"read at {offset + done}")
            if got.value == 0:
                break  # the end of the file
            done += got.value
        return buf.raw[:done]

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write `data` at `offset`, allocating blocks in holes. The file's buffered block is
        written before returning, so that a block that cannot be allocated (ENOSPC) fails
        the write that needs it, not a later one."""
        if not self.fs.writable:
            raise OSError(errno.EROFS, "the file system is open read-only")
        self.fs.load_bitmaps()
        if self.stale:  # the buffered block may be older than the device: start afresh
            self.stale = False
            self._reopen()
            self._h()
        try:
            self._seek(offset)
            written, done = c_uint(), 0
            while done < len(data):
                chunk = data[done:]
                code = self.lib.ext2fs_file_write(self._h(), chunk, len(chunk), byref(written))
                _check(code, f"write at {offset + done}")
                if written.value == 0:
                    raise OSError(errno.EIO, f"write at {offset + done}: nothing written")
                done += written.value
            self.flush()
        except OSError:
            self._reopen()
            raise

    def _reopen(self) -> None:
        """After a failed write: drop the handle, and with it a buffered block that could
        not be written (every later call would try it again), and open the inode anew."""
        handle, self.handle = self.handle, None
        if handle is not None:
            self.lib.ext2fs_file_close(handle)  # frees it, whatever its flush says
        new = c_void_p()
        code = self.lib.ext2fs_file_open2(
            self.fs._handle(), self.ino, None, EXT2_FILE_WRITE, byref(new)
        )
        if code:
            self.fs.files.discard(self)
            log.error("ext2: inode %d: reopening after a failed write: %s", self.ino,
                      error_message(code))  # fmt: skip
            return
        self.handle = new.value

    def flush(self) -> None:
        if self.handle is not None:
            _check(self.lib.ext2fs_file_flush(self.handle), f"inode {self.ino}: flush")

    def close(self) -> None:
        if self.handle is None:
            return
        handle, self.handle = self.handle, None
        self.fs.files.discard(self)
        _check(self.lib.ext2fs_file_close(handle), f"inode {self.ino}: close")
