"""file: serve a regular file or a block device (nbdkit-file-plugin).

Reads and writes go straight between the request buffer and the file (`preadv`/`pwritev`, no
extra copy); flush is `fdatasync`, and FUA is a `fdatasync` after the write. Trim punches a
hole (`fallocate PUNCH_HOLE|KEEP_SIZE`); write-zeroes punches a hole when the client allows
holes, else uses `ZERO_RANGE`, and when the file system can do neither the server writes
zeros instead (a fast-zero request then fails with ENOTSUP, as the spec asks). Extents come
from `SEEK_DATA`/`SEEK_HOLE` on regular files (holes are reported as hole+zero); cache is
`posix_fadvise(WILLNEED)`. A file we may not write (permissions, read-only mount, immutable)
is served read-only. The size is read again for every new connection, so a file that grew
shows its new size to new clients.

A read first takes what the page cache holds, at once on the event loop (`preadv` with
RWF_NOWAIT, where the file system has it: ext4 and xfs do, tmpfs does not); what is not cached
is read in a worker thread, so a slow disk never holds the other requests up. Writes of 256K
or more, flushes, trims and write-zeroes (ext4 takes milliseconds to punch even 4K) run in
worker threads too (nodes/offload.py); smaller writes go into the page cache on the loop,
unless a page they cover only in part is not cached (the kernel would read it from the disk
first).

`cache=none` opens the file with O_DIRECT so the page cache is bypassed (nbdkit's cache=none
instead drops pages after use; the aim is the same). O_DIRECT needs aligned I/O: the node
then advertises a minimum block size (the device's logical sector size, 4096 for files) and
moves data through an aligned buffer; a size that is not a multiple of it is rounded down.
File systems without O_DIRECT (tmpfs) refuse to start with a message saying so.

`dir=DIRECTORY` (nbdkit's directory mode) serves every regular file and block device directly
inside DIRECTORY, each as the export named by its file name: clients choose one by export name
and NBD_OPT_LIST lists them (subdirectories, pipes, sockets and other special files are left
out). Both look at the directory as it is now: a file added later is listed and served, a
removed one is gone. Symbolic links in the directory are followed, wherever they point (as
nbdkit does): what the directory holds is the operator's choice. No name leads out of it: the
default export "", names with "/", "." and ".." are refused (NBD_REP_ERR_UNKNOWN), and files
are opened relative to the directory opened at start (a later rename of DIRECTORY changes
nothing). A file is opened on first use and shared by the connections to it; a file replaced
or removed in the directory is closed when its last connection ends (a client caught in its
handshake by the change is disconnected). At most 16 files no client uses stay open (the least
recently asked about are closed, and reopened when a client that asked about one starts), so a
client asking about every file of a big directory cannot use up the node's file descriptors;
the option limit of the handshake grows by two per export a client listed, so that `nbdinfo
--list` can ask about each. `cache=` and `fadvise=` apply to each file; the
node itself has size 0 (`nbdfabric ctl ADDR info` lists the exports in its status), flushes
every open file at shutdown and on `ctl pause --flush`, and takes no --export-name.

Params: `file` (magic: path of a file or block device) or `dir` (a directory), one of them;
`cache` (default | none), `fadvise` (normal | random | sequential: the kernel's read-ahead
hint, default normal).

Example: `nbdfabric node file disk.img --listen unix:/tmp/f.sock`, then
`qemu-img map --output=json 'nbd+unix:///?socket=/tmp/f.sock'` matches `qemu-img map disk.img`.
With `nbdfabric node file dir=/srv/disks --listen unix:/tmp/d.sock`, `nbdinfo --list
'nbd+unix:///?socket=/tmp/d.sock'` lists the files and `nbd+unix:///a.img?socket=/tmp/d.sock`
is /srv/disks/a.img.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from typing import Any, Literal

from pydantic import model_validator

from ..base import (
    Backend,
    Capabilities,
    Extents,
    Holes,
    MultiExport,
    Plugin,
    Support,
    fua_requested,
    may_trim,
)
from ..offload import run_blocking
from ..params import Params, param
from ..params import Params as ParamsModel  # (in the classes, `Params` is their own)
from ..protocol.constants import MAX_STRING, Extent
from ..registry import register

log = logging.getLogger("nbdfabric.file")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
BLKSSZGET = 0x1268  #: ioctl: a block device's logical sector size
#: Requests this large run in a worker thread so one slow disk op does not stall the others.
THREAD_THRESHOLD = 256 * 1024
#: A read the page cache holds is copied on the event loop up to this size (cheaper than the
#: hand-off to a thread); a larger one is copied in a thread, so the loop is not held longer
#: than about a millisecond by one request.
INLINE_READ_MAX = 4 * 1024 * 1024
PAGE = mmap.PAGESIZE
#: O_DIRECT alignment for regular files: safe on every device (logical sectors are <= 4096).
FILE_DIRECT_ALIGN = 4096
#: Describe at most this many extents per request (the spec lets us return less than asked).
MAX_EXTENTS = 1024
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
_FADVICE = {
    "normal": os.POSIX_FADV_NORMAL,
    "random": os.POSIX_FADV_RANDOM,
    "sequential": os.POSIX_FADV_SEQUENTIAL,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode argument, which os.posix_fallocate does not have."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class FileParams(Params):
    file: str | None = param(
        None, description="path of the file or block device to serve (this or dir=)", path=True
    )
    dir: str | None = param(
        None,
        path=True,
        description="serve each regular file and block device in this directory as the export "
        "of its name (this or file=)",
    )
    cache: Literal["default", "none"] = param(
        "default", description="none: bypass the page cache with O_DIRECT"
    )
    fadvise: Literal["normal", "random", "sequential"] = param(
        "normal", description="access-pattern hint for the kernel's read-ahead"
    )

    @model_validator(mode="after")
    def _one_mode(self) -> FileParams:
        if self.file is not None and self.dir is not None:
            raise ValueError(f"give file= or dir=, not both (file={self.file!r}, dir={self.dir!r})")
        if self.file is None and self.dir is None:
            raise ValueError("give file=FILENAME (or a bare FILENAME) or dir=DIRECTORY")
        return self


def _rotational(st: os.stat_result) -> bool:
    """What sysfs says about the disk under this file (False when it cannot tell)."""
    dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for path in (f"{base}/queue/rotational", f"{base}/../queue/rotational"):  # disk, partition
        try:
            with open(path) as f:
                return f.read().strip() == "1"
        except OSError:
            continue
    return False


def _sector_size(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0])


@register
class File(Plugin):
    """A regular file or block device (with dir=: each one in a directory, one export each)."""

    kind = "file"
    shareable = True  #: --workers (see workers.py)
    Params = FileParams
    magic = "file"
    params: FileParams

    @classmethod
    def create(cls, params: ParamsModel) -> Backend:
        assert isinstance(params, FileParams)
        return FileDirectory(params) if params.dir is not None else cls(params)

    @classmethod
    def multi_export(cls, params: ParamsModel) -> MultiExport | None:
        assert isinstance(params, FileParams)
        return "directory" if params.dir is not None else None

    def __init__(self, params: FileParams) -> None:
        super().__init__(params)
        self.fd = -1
        self.writable = False
        self.block_device = False
        self.rotational = False
        self.align = 0  #: O_DIRECT alignment; 0 when the page cache is used
        self.sector = 512  #: a block device's logical sector size (discards are rounded to it)
        self.unsupported: set[int] = set()  #: fallocate modes this file system refused
        self.identity = (0, 0)  #: (st_dev, st_ino) of the open file
        #: Reads try the page cache first (RWF_NOWAIT) where the file system can (not with
        #: O_DIRECT: there RWF_NOWAIT means something else).
        self.nowait = False
        self._probe = bytearray(1)  #: _cached reads one byte into it

    # Lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        assert self.params.file is not None  # FileParams: file= or dir= (FileDirectory)
        self.open(self.params.file)

    def open(self, path: str, dir_fd: int | None = None) -> None:
        """Open `path` (relative to `dir_fd` if given): read-write, else read-only."""
        direct = self.params.cache == "none"
        flags = os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        if dir_fd is not None:
            # The name was a file when looked at; if a FIFO took its place since, opening
            # must not wait for a writer (the type is checked below).
            flags |= os.O_NONBLOCK | os.O_NOCTTY
        try:
            self.fd = os.open(path, flags | os.O_RDWR, dir_fd=dir_fd)
            self.writable = True
        except OSError as exc:
            if exc.errno in _READ_ONLY:
                self.fd = os.open(path, flags | os.O_RDONLY, dir_fd=dir_fd)
            elif direct and exc.errno == errno.EINVAL:
                raise OSError(
                    errno.EINVAL,
                    f"{path}: cache=none needs O_DIRECT, which this file system does not "
                    "support; use cache=default",
                ) from None
            else:
                raise
        st = os.fstat(self.fd)
        self.block_device = stat.S_ISBLK(st.st_mode)
        if not (self.block_device or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            self.fd = -1
            raise OSError(errno.EINVAL, f"{path}: not a regular file or block device")
        if dir_fd is not None:
            os.set_blocking(self.fd, True)
        self.identity = (st.st_dev, st.st_ino)
        self.rotational = _rotational(st)
        if self.block_device:
            self.sector = _sector_size(self.fd)
        if direct:
            self.align = self.sector if self.block_device else FILE_DIRECT_ALIGN
        os.posix_fadvise(self.fd, 0, 0, _FADVICE[self.params.fadvise])
        self.nowait = self.reads_inline = not direct and _reads_nowait(self.fd)
        if not self.writable:
            log.warning("%s is not writable: serving it read-only", path)

    async def stop(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def size(self) -> int:
        # A block device's st_size is 0: its size is where its end is.
        size = os.lseek(self.fd, 0, os.SEEK_END) if self.block_device else os.fstat(self.fd).st_size
        return size - size % self.align if self.align else size

    def capabilities(self) -> Capabilities:
        # One fd shared by every connection, flushed with fdatasync: multi-conn is safe.
        return Capabilities(
            size=self.size(),
            writable=self.writable,
            flush=True,
            fua=Support.NATIVE,
            trim=True,
            zero=Support.NATIVE,
            fast_zero=True,
            cache=Support.NATIVE,
            extents=not self.block_device,
            multi_conn=True,
            rotational=self.rotational,
            block_min=self.align,
            block_preferred=max(self.align, 4096) if self.align else 0,
        )

    # Data ----------------------------------------------------------------------------------

    def read_now(self, buf: memoryview, offset: int) -> bool:
        return len(buf) <= INLINE_READ_MAX and self._read_cached(buf, offset) == len(buf)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        done = self._read_cached(buf, offset) if len(buf) <= INLINE_READ_MAX else 0
        if done < len(buf):
            rest = buf[done:] if done else buf
            if self.nowait or len(rest) >= THREAD_THRESHOLD:
                # Not in the page cache (or too big to copy on the loop): the disk may be slow.
                await run_blocking(self._read, rest, offset + done)
            else:
                self._read(rest, offset + done)
        return None

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if len(buf) >= THREAD_THRESHOLD or self._reads_first(offset, len(buf)):
            await run_blocking(self._write, buf, offset)
        else:
            self._write(buf, offset)  # into the page cache: cheaper than a hand-off
        if fua_requested(flags):
            await self.flush(0)

    async def flush(self, flags: int) -> None:
        await run_blocking(os.fdatasync, self.fd)  # may wait long for the disk

    async def trim(self, count: int, offset: int, flags: int) -> None:
        # A hint: where punching is unsupported (or not sector-aligned) nothing happens.
        start, end = offset, offset + count
        if self.block_device:  # a discard must cover whole sectors
            start, end = -(-start // self.sector) * self.sector, end - end % self.sector
        if start < end:
            await self._fallocate_off(PUNCH_HOLE, start, end - start)
        if fua_requested(flags):
            await self.flush(0)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        punched = may_trim(flags) and await self._fallocate_off(PUNCH_HOLE, offset, count)
        if not (punched or await self._fallocate_off(ZERO_RANGE, offset, count)):
            # The server falls back to writing zeros (or fails a FAST_ZERO request).
            raise OSError(errno.ENOTSUP, "this file cannot zero without writing")
        if fua_requested(flags):
            await self.flush(0)

    async def _fallocate_off(self, mode: int, offset: int, count: int) -> bool:
        """_fallocate in a worker thread: ext4 takes milliseconds to punch even 4K (it waits
        for its journal), which on the loop held every other request of the node that long."""
        if mode in self.unsupported:
            return False
        return await run_blocking(self._fallocate, mode, offset, count)

    def _fallocate(self, mode: int, offset: int, count: int) -> bool:
        """True when done; False when the file cannot (remembered) or not at this range."""
        if mode in self.unsupported:
            return False
        try:
            fallocate(self.fd, mode, offset, count)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self.unsupported.add(mode)
                return False
            if exc.errno == errno.EINVAL:  # e.g. not sector-aligned on a block device
                return False
            raise
        return True

    async def cache(self, count: int, offset: int, flags: int) -> None:
        os.posix_fadvise(self.fd, offset, count, os.POSIX_FADV_WILLNEED)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        out: list[tuple[int, int]] = []
        pos, end = offset, offset + count
        hole = Extent.HOLE | Extent.ZERO
        while pos < end and len(out) < MAX_EXTENTS:
            data = self._seek(pos, os.SEEK_DATA, end)
            if data > pos:
                out.append((min(data, end) - pos, hole))
                pos = min(data, end)
                continue
            next_hole = min(self._seek(pos, os.SEEK_HOLE, end), end)
            out.append((next_hole - pos, 0))
            pos = next_hole
        return out

    def _seek(self, pos: int, whence: int, end: int) -> int:
        try:
            return os.lseek(self.fd, pos, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                return end
            if exc.errno == errno.EINVAL:  # no SEEK_DATA/SEEK_HOLE here: all data
                return pos if whence == os.SEEK_DATA else end
            raise

    # Plumbing ------------------------------------------------------------------------------

    def _reads_first(self, offset: int, count: int) -> bool:
        """Whether a write must read from the disk first: a page it covers only in part, and
        that is not cached, is read before the write can go into it (a 512-byte write then
        waits for the disk)."""
        if not self.nowait:
            return False  # cannot tell (and on tmpfs it never does)
        head, tail = offset % PAGE, (offset + count) % PAGE
        return bool(
            (head and not self._cached(offset - head))
            or (tail and not self._cached(offset + count - tail))
        )

    def _cached(self, offset: int) -> bool:
        """Whether the page at `offset` is in the page cache (or past the end of the file)."""
        try:
            os.preadv(self.fd, [self._probe], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        return True

    def _read(self, buf: memoryview, offset: int) -> None:
        if self.align:
            self._check_aligned(buf, offset)
            with _Bounce(len(buf)) as bounce:
                read_all(self.fd, bounce, offset)
                buf[:] = bounce
        else:
            read_all(self.fd, buf, offset)

    def _read_cached(self, buf: memoryview, offset: int) -> int:
        """Read what the page cache holds of `buf`'s range from its start, without waiting for
        the disk (RWF_NOWAIT); how many bytes that was. A cached read costs the loop a copy,
        cheaper than the hand-off to a thread; a miss goes to one."""
        pos = 0
        if self.nowait:
            try:
                while pos < len(buf):
                    n = os.preadv(self.fd, [buf[pos:]], offset + pos, os.RWF_NOWAIT)
                    if n == 0:
                        break  # the end of the file: the ordinary read says so
                    pos += n
            except BlockingIOError:
                pass  # the rest is not cached
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.nowait = self.reads_inline = False  # it cannot after all: as before
        return pos

    def _write(self, buf: memoryview, offset: int) -> None:
        if self.align:
            self._check_aligned(buf, offset)
            with _Bounce(len(buf)) as bounce:
                bounce[:] = buf
                write_all(self.fd, bounce, offset)
        else:
            write_all(self.fd, buf, offset)

    def _check_aligned(self, buf: memoryview, offset: int) -> None:
        # The server refuses requests that break block_min, so this only guards our own calls.
        if offset % self.align or len(buf) % self.align:
            raise OSError(errno.EINVAL, f"cache=none needs {self.align}-byte aligned requests")


#: Files of a dir= node kept open with no connection (looked up by INFO only, or their last client
#: gone): past this many, the least recently looked up are closed, so that a client asking about
#: every file of a big directory cannot use up the node's file descriptors. A client that looked
#: up a file since closed gets it reopened when it starts (if it is still the same file).
MAX_IDLE_FILES = 16


class FileDirectory(Plugin):
    """file dir=: the regular files and block devices in a directory, one export each."""

    kind = "file"
    shareable = True  #: --workers: each worker opens the directory and its files itself
    Params = FileParams
    magic = "file"
    params: FileParams

    def __init__(self, params: FileParams) -> None:
        super().__init__(params)
        self.dir_fd = -1
        #: The open file of each name, as last seen, least recently looked up first.
        self.files: collections.OrderedDict[str, DirectoryFile] = collections.OrderedDict()
        #: Files replaced or removed in the directory, open while connections still use them.
        self.retired: set[DirectoryFile] = set()

    async def start(self) -> None:
        path = self.params.dir
        assert path is not None
        try:
            self.dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"dir={path}: {exc.strerror}") from None

    async def stop(self) -> None:
        for member in [*self.files.values(), *self.retired]:
            await member.stop()
        self.files.clear()
        self.retired.clear()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def capabilities(self) -> Capabilities:
        # The node as a whole (control plane, shutdown): no data of its own; its files may be
        # written, and flush reaches every open one. Each export has its own capabilities.
        return Capabilities(size=0, writable=True, flush=True)

    def status(self) -> dict[str, Any]:
        return {
            "directory": self.params.dir,
            "exports": [name for name, _ in self.exports()],
            "open": {
                name: {"size": f.size(), "writable": f.writable, "connections": f.users}
                for name, f in sorted(self.files.items())
            },
            "retired_open": len(self.retired),
        }

    # Exports --------------------------------------------------------------------------------

    def exports(self) -> list[tuple[str, str]]:
        try:
            names = os.listdir(self.dir_fd)  # from the start each time (rewinddir)
        except OSError as exc:
            log.warning("listing %s failed: %s", self.params.dir, exc)
            return []
        found = {name: st for name in names if (st := self._lookup(name)) is not None}
        for name, member in list(self.files.items()):  # forget what is gone or replaced
            st = found.get(name)
            if st is None or (st.st_dev, st.st_ino) != member.identity:
                self._retire(name)
        return [(name, "") for name in sorted(found)]

    def for_export(self, name: str) -> DirectoryFile | None:
        st = self._lookup(name)
        member = self.files.get(name)
        if member is not None and (st is None or (st.st_dev, st.st_ino) != member.identity):
            self._retire(name)
            member = None
        if st is None:
            return None
        if member is not None:
            self.files.move_to_end(name)
            return member
        member = DirectoryFile(self.params, self, name)
        try:
            member.open(name, dir_fd=self.dir_fd)
        except OSError as exc:
            log.warning("%s/%s: %s", self.params.dir, name, exc.strerror or exc)
            return None
        self.files[name] = member  # (open() has said if it is served read-only)
        self._close_idle()
        return member

    def _close_idle(self) -> None:
        idle = [name for name, f in self.files.items() if not f.users]
        for name in idle[: max(0, len(idle) - MAX_IDLE_FILES)]:
            self.files.pop(name).close()

    def adopt(self, member: DirectoryFile) -> None:
        """`member` was reopened for a client that looked it up before it was closed: it is the
        name's file again, or, if the name has another open file meanwhile, kept apart and
        closed after its last client."""
        if self.files.setdefault(member.name, member) is not member:
            member.retired = True
            self.retired.add(member)

    def _lookup(self, name: str) -> os.stat_result | None:
        """The stat (links followed) of `name` in the directory if it is one we serve: a
        plain name (no "/", not "", "." or "..", UTF-8 within NBD's 4096 bytes) of a regular
        file or block device. None for everything else."""
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            return None
        try:
            if len(name.encode()) > MAX_STRING:
                return None
            st = os.stat(name, dir_fd=self.dir_fd)
        except (OSError, UnicodeError):  # gone, a dangling link, a name not in UTF-8
            return None
        return st if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode) else None

    def _retire(self, name: str) -> None:
        member = self.files.pop(name)
        if member.users:
            member.retired = True
            self.retired.add(member)
        else:
            member.close()

    # Node-level operations ------------------------------------------------------------------

    async def flush(self, flags: int) -> None:
        """Every open file that may have been written (shutdown, ctl pause --flush)."""
        members = [f for f in (*self.files.values(), *self.retired) if f.writable and f.fd >= 0]
        results = await asyncio.gather(*(f.flush(0) for f in members), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


class DirectoryFile(File):
    """One file of a dir= node: opened relative to the directory, shared by the connections to
    its export (counted, so that a replaced or removed file closes after its last one)."""

    def __init__(self, params: FileParams, directory: FileDirectory, name: str) -> None:
        super().__init__(params)
        self.directory = directory
        self.name = name
        self.users = 0  #: connections using it
        self.retired = False  #: no longer what `name` is in the directory

    async def open_connection(self) -> None:
        if self.fd < 0:  # closed since this client's lookup: idle, replaced or removed
            self._reopen()
        self.users += 1

    def _reopen(self) -> None:
        """Open the name again for a client told about this file; ESTALE if it is another
        file now (replaced or removed since the lookup)."""
        told = self.identity
        try:
            self.open(self.name, dir_fd=self.directory.dir_fd)
        except OSError as exc:
            raise OSError(errno.ESTALE, f"{self.name}: {exc.strerror}; reconnect") from None
        if self.identity != told:
            self.close()
            raise OSError(errno.ESTALE, f"{self.name} changed in the directory; reconnect")
        self.directory.adopt(self)

    async def close_connection(self) -> None:
        if self.fd < 0:  # open_connection refused it
            return
        self.users -= 1
        if self.retired and not self.users:
            self.close()
            self.directory.retired.discard(self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _reads_nowait(fd: int) -> bool:
    """Whether `fd`'s file system can read with RWF_NOWAIT (ext4 and xfs can, tmpfs cannot)."""
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        pass  # it can, and the first byte is not cached
    except OSError as exc:
        return exc.errno not in _UNSUPPORTED
    return True


class _Bounce:
    """A page-aligned buffer (an anonymous mmap) for O_DIRECT, which cannot use ours."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __enter__(self) -> memoryview:
        self.map = mmap.mmap(-1, self.length)
        self.view = memoryview(self.map)
        return self.view

    def __exit__(self, *exc: object) -> None:
        self.view.release()
        self.map.close()


def read_all(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from `fd` at `offset` (preadv until done); EIO if the file ends first."""
    pos = 0
    while pos < len(buf):
        n = os.preadv(fd, [buf[pos:]], offset + pos)
        if n == 0:
            raise OSError(errno.EIO, "read past the end of the file (was it truncated?)")
        pos += n


def write_all(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of `buf` to `fd` at `offset` (pwritev until done)."""
    pos = 0
    while pos < len(buf):
        pos += os.pwritev(fd, [buf[pos:]], offset + pos)
