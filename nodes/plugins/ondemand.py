"""ondemand: persistent file systems made on demand, one per export name (nbdkit-ondemand-plugin).

Each export name is a file in the directory `dir`: the first client to ask for a name (NBD_OPT
INFO, GO or EXPORT_NAME, while it waits in the handshake) gets a new file system made there, of
`size` bytes, formatted by mkfs with `type` (default ext4) and `label`, or whatever the shell
script `command=` makes at "$disk"; later clients, after a node restart too, get the same file
back as it was left. The default export "" is the file `default`. Names are refused
(NBD_REP_ERR_UNKNOWN), as nbdkit's manual says, if they hold ".", "/" or ":" or are longer
than 255 bytes; so is a name whose file is not a regular file or block device (after links: a
directory, a FIFO, a dangling link). A new disk is made in a hidden folder of the directory
(`.ondemandXXXXXX`, which no export name reaches) and linked into place only once made, never
over a file that appeared meanwhile: no client gets a half-made disk, even after a crash (a
node killed -9 while it makes one leaves that folder behind, for the operator to remove). Two
clients asking for a new name at once wait for the same making, which goes on if they leave.

One client at a time uses an export: its file is locked (an open file description lock,
F_OFD_SETLK, as nbdkit 1.32 takes, so nbdkit and this node exclude each other on the same
directory) from the client's lookup until it disconnects or asks for another name. Another
client asking for it is refused (NBD_REP_ERR_UNKNOWN; the log says "filesystem is locked by
another client"), or with `wait=true` waits until it is free (within --handshake-limit). A
client holds one export at a time, so waiters never wait on each other. Multi-conn is not
offered. NBD_OPT_LIST lists "" (the default export) and each regular file (or block device)
of the directory whose name is a valid export name (`default` is listed as ""): `nbdinfo
--list` shows what exists.

Params: `dir` (required; the exports' directory, which must exist), `size` (magic; required:
each new disk's size; with command= only what $size says), `type` (mkfs.TYPE: ext2, ext3, ext4,
xfs, vfat, btrfs, ...; default ext4), `label`, `command` (a shell script run by /bin/sh in the
node's directory with $disk, $size and the `type`, `label` and other KEY=VALUE params given as
shell variables; KEY=VALUE only with command=), `wait` (boolean, default false).

Differences from nbdkit 1.32, deliberate: $disk is "DIR/.ondemandXXXXXX/NAME" (the same file
name, in the hidden folder; nbdkit makes "DIR/NAME" in place, seen half-made if it fails or
dies). A connection keeps the lock from its first lookup (INFO) on, where nbdkit locks for each
INFO and again for GO. The list has only regular files (nbdkit lists every name in the
directory but those starting with ".": directories and FIFOs too, which it then refuses or
serves as 0 bytes). A missing `dir`, an unknown `type`, `size=0` without command= and KEY=VALUE
without command= stop the node at start (exit 1). Cache requests are served (posix_fadvise).

Example: `nbdfabric node ondemand 1G dir=/var/tmp/exports --listen unix:/tmp/o.sock` (a bare
size comes first; nbdkit takes it anywhere); then
`qemu-img info 'nbd+unix:///export1?socket=/tmp/o.sock'` makes /var/tmp/exports/export1, a 1G
ext4 file system, and `nbdinfo --list 'nbd+unix:///?socket=/tmp/o.sock'` lists it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
import tempfile
from typing import Any

from ..base import Backend, Capabilities, MultiExport, Plugin, current_client
from ..params import Params as ParamsModel
from ..params import param
from ..registry import register
from ._mkdisk import DiskFile, DiskParams, check_params, make_disk

log = logging.getLogger("nbdfabric.ondemand")

#: The longest export name (a file name: NAME_MAX bytes).
NAME_MAX = 255
#: What an export name may not hold (nbdkit's manual: ".", "/" and ":"; NUL is no file name).
FORBIDDEN = frozenset("./:\0")
#: The file of the default export "".
DEFAULT_FILE = "default"
#: How long wait=true sleeps between tries for a locked export, at most.
MAX_LOCK_POLL = 0.5
#: struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padding.
FLOCK = struct.Struct("hhqqi4x")


def file_name(name: str) -> str | None:
    """The file export `name` is in the directory, or None if the name is refused."""
    if name == "":
        return DEFAULT_FILE
    if FORBIDDEN.intersection(name):
        return None
    try:
        if len(name.encode()) > NAME_MAX:
            return None
    except UnicodeError:  # a file name that is no UTF-8 (listing): no client can ask for it
        return None
    return name


def try_lock(fd: int, writable: bool) -> bool:
    """Lock the whole file open at `fd` (an OFD lock: it belongs to this open file, so another
    open of it, in this process or another, conflicts): False if someone else holds it."""
    kind = fcntl.F_WRLCK if writable else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class OndemandParams(DiskParams):
    dir: str = param(
        description='the exports\' directory: export NAME is the file NAME there ("": default)',
        path=True,
    )
    wait: bool = param(
        False, description="a client asking for an export in use waits for it (else: refused)"
    )


@register
class OnDemand(Plugin):
    """One file system per export name, made on first use, locked while a client has it."""

    kind = "ondemand"
    Params = OndemandParams
    magic = "size"
    params: OndemandParams
    prepares_exports = True

    @classmethod
    def multi_export(cls, params: ParamsModel) -> MultiExport | None:
        return "on-demand"

    def __init__(self, params: OndemandParams) -> None:
        super().__init__(params)
        self.program: str | None = None  #: mkfs.TYPE (None with command=)
        self.path = os.path.abspath(params.dir)  #: the directory, absolute
        self.dir_fd = -1
        #: The export each connection holds (open and locked), by connection id.
        self.held: dict[int, DiskFile] = {}
        #: Disks being made, by file name (clients asking for one wait for the same).
        self.making: dict[str, asyncio.Future[None]] = {}
        self.made = 0
        self.failed = 0

    # Lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.program = check_params(self.params)
        try:
            self.dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"dir={self.params.dir}: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            await self.stop()
            raise ValueError(f"dir={self.params.dir}: no permission to make disks there")

    async def stop(self) -> None:
        for future in self.making.values():
            future.cancel()
        for disk in self.held.values():
            disk.close()
        self.held.clear()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def capabilities(self) -> Capabilities:
        # The node as a whole (control plane, shutdown): each export has its own; flush
        # reaches every one in use.
        return Capabilities(size=0, writable=True, flush=True)

    async def flush(self, flags: int) -> None:
        for disk in list(self.held.values()):
            if disk.writable and disk.fd >= 0:
                await disk.flush(0)

    def status(self) -> dict[str, Any]:
        return {
            "directory": self.path,
            "exports": [name for name, _ in self.exports()],
            "in_use": sorted(d.name for d in self.held.values()),
            "made": self.made,
            "failed": self.failed,
        }

    # Exports --------------------------------------------------------------------------------

    def exports(self) -> list[tuple[str, str]]:
        try:
            names = os.listdir(self.dir_fd)  # from the start each time (rewinddir)
        except OSError as exc:
            log.warning("listing %s failed: %s", self.path, exc.strerror)
            names = []
        found = sorted(n for n in names if n != DEFAULT_FILE and self._is_export(n))
        return [("", ""), *((name, "") for name in found)]

    def _is_export(self, name: str) -> bool:
        if file_name(name) != name:
            return False
        try:
            mode = os.stat(name, dir_fd=self.dir_fd).st_mode
        except OSError:
            return False
        return stat.S_ISREG(mode) or stat.S_ISBLK(mode)

    async def prepare_export(self, name: str | None) -> None:
        if name is None:
            return
        connection = current_client.get().connection_id
        wanted = file_name(name)
        held = self.held.get(connection)
        if held is not None:
            if held.name == wanted:
                return
            self._release(connection)  # one export at a time: a waiter holds none
        if wanted is None:
            return
        try:
            disk = await self._take(wanted)
        except OSError as exc:
            who = current_client.get().address
            log.warning("ondemand: export %r for %s: %s", name, who, exc.strerror or exc)
            return
        self.held[connection] = disk

    def for_export(self, name: str) -> Backend | None:
        held = self.held.get(current_client.get().connection_id)
        return held if held is not None and held.name == file_name(name) else None

    async def connection_ended(self) -> None:
        self._release(current_client.get().connection_id)

    def _release(self, connection: int) -> None:
        disk = self.held.pop(connection, None)
        if disk is not None:
            disk.close()  # and with its file description, the lock

    # Taking an export: made if new, opened, locked ------------------------------------------

    async def _take(self, name: str) -> DiskFile:
        """Export `name`'s file for this connection: made if it is not there, opened and
        locked (OSError EBUSY if another client has it and we do not wait)."""
        delay = 0.02
        while True:
            if not self._exists(name):
                await self._make_once(name)
            disk = DiskFile(name)
            disk.open(name, dir_fd=self.dir_fd)
            try:
                locked = try_lock(disk.fd, disk.writable)
            except BaseException:
                disk.close()
                raise
            if locked and self._still(disk):
                return disk
            disk.close()
            if locked:  # replaced or removed meanwhile: take what the name is now
                continue
            if not self.params.wait:
                raise OSError(errno.EBUSY, "filesystem is locked by another client")
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_LOCK_POLL)

    def _exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _still(self, disk: DiskFile) -> bool:
        """Whether the name still is the file `disk` opened (it may have changed while we
        waited for the lock)."""
        try:
            st = os.stat(disk.name, dir_fd=self.dir_fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == disk.identity

    async def _make_once(self, name: str) -> None:
        """Make export `name`'s file, once for all the clients asking for it now. The making
        goes on if they give up (the disk is for later clients too)."""
        future = self.making.get(name)
        if future is None:
            future = asyncio.ensure_future(self._make(name))
            self.making[name] = future
            future.add_done_callback(lambda done: self._made(name, done))
        await asyncio.shield(future)

    def _made(self, name: str, done: asyncio.Future[None]) -> None:
        self.making.pop(name, None)
        if done.cancelled():
            return
        exc = done.exception()  # retrieved here: nobody may be waiting for it any more
        if exc is None:
            self.made += 1
        else:
            self.failed += 1
            log.warning("ondemand: making %r failed: %s", name, getattr(exc, "strerror", exc))

    async def _make(self, name: str) -> None:
        folder = tempfile.mkdtemp(prefix=".ondemand", dir=self.path)
        try:
            path = os.path.join(folder, name)
            await make_disk(self.params, self.program, path)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise OSError(errno.EINVAL, "command= made no regular file at $disk")
            try:
                os.link(path, name, dst_dir_fd=self.dir_fd, follow_symlinks=False)
            except FileExistsError:
                pass  # made meanwhile (another node on the directory): that one is served
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                    raise
                if not self._exists(name):  # a file system without hard links
                    os.rename(path, name, dst_dir_fd=self.dir_fd)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
