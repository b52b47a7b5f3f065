"""tmpdisk: a fresh temporary file system for each client (nbdkit-tmpdisk-plugin).

Each connection gets a disk of its own: a sparse file of `size` bytes in $TMPDIR (default
/var/tmp) that mkfs formats with `type` (default ext4) and `label`, or whatever the shell
script `command=` makes at "$disk". The disk is made when the client first names an export
(NBD_OPT_INFO, GO or EXPORT_NAME, while it waits in the handshake, within --handshake-limit),
kept for the rest of that connection (an INFO and then a GO see the same disk), and gone when
the client disconnects however it does (a kill -9 too): the file is unlinked as soon as it is
open, so the disk lives only as long as the node holds it, and nothing is left in $TMPDIR even
if the node itself is killed (but for a disk being made at that moment: its command, in a
process group of its own, is ended when the client gives up or the node stops, not when the
node is killed). Clients never see each other's disks; multi-conn is not offered
(a second connection is another disk). Every export name leads to the client's disk; the list
(NBD_OPT_LIST) has the default export "" only. A disk that cannot be made (mkfs fails, the
command fails or makes nothing) refuses that client (NBD_REP_ERR_UNKNOWN, the reason in the
node's log) and the node serves on.

Params: `size` (magic; required: the disk's size; with command= only what $size says), `type`
(mkfs.TYPE: ext2, ext3, ext4, xfs, vfat, btrfs, ...; default ext4), `label`, `command` (a
shell script run by /bin/sh in the node's directory, with $disk, $size, and $type, $label and
any other KEY=VALUE param given as shell variables: `os=fedora-31 command='virt-builder -o
"$disk" "$os"'`). Other KEY=VALUE params are taken only with command= and must be shell variable
names; `disk` is the node's.

Differences from nbdkit 1.32, deliberate: an unknown `type` (no mkfs.TYPE installed), `size=0`
without command= and KEY=VALUE params without command= are refused at start (exit 1); nbdkit
starts and then fails every client, or ignores them. nbdkit makes a disk for each INFO and one
more for GO; here a connection has one. $disk is "$TMPDIR/tmpdiskXXXXXX/disk" in both. Cache
requests are served (posix_fadvise), as the file plugin does.

Example: `nbdfabric node tmpdisk 1G label=scratch --listen unix:/tmp/t.sock`; then `nbdcopy
'nbd+unix:///?socket=/tmp/t.sock' copy.img && blkid copy.img` finds an ext4 file system labelled
scratch, a fresh one for every connection. `nbdfabric node tmpdisk 16G command='truncate -s
$size "$disk"'` gives every client a blank disk of its own.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from typing import Any

from ..base import Backend, Capabilities, MultiExport, Plugin, current_client
from ..params import Params as ParamsModel
from ..registry import register
from ._mkdisk import (
    DiskFile,
    DiskParams,
    check_params,
    check_temp_directory,
    make_disk,
    temp_directory,
)

log = logging.getLogger("nbdfabric.tmpdisk")


class TmpdiskParams(DiskParams):
    pass


@register
class TmpDisk(Plugin):
    """A disk of its own for each connection, made when it names an export."""

    kind = "tmpdisk"
    Params = TmpdiskParams
    magic = "size"
    params: TmpdiskParams
    prepares_exports = True

    @classmethod
    def multi_export(cls, params: ParamsModel) -> MultiExport | None:
        return "on-demand"

    def __init__(self, params: TmpdiskParams) -> None:
        super().__init__(params)
        self.program: str | None = None  #: mkfs.TYPE (None with command=)
        self.directory = ""
        #: Each connection's disk, by connection id: from its first lookup to its end.
        self.disks: dict[int, DiskFile] = {}
        self.made = 0
        self.failed = 0

    async def start(self) -> None:
        self.program = check_params(self.params)
        self.directory = temp_directory()
        check_temp_directory(self.directory)

    async def stop(self) -> None:
        for disk in self.disks.values():
            disk.close()
        self.disks.clear()

    def capabilities(self) -> Capabilities:
        # The node as a whole (control plane): each connection's disk has its own.
        return Capabilities(size=0, writable=True)

    def status(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "disks": len(self.disks),
            "made": self.made,
            "failed": self.failed,
        }

    # Exports: every name is the connection's own disk ----------------------------------------

    def exports(self) -> list[tuple[str, str]]:
        return [("", "")]

    async def prepare_export(self, name: str | None) -> None:
        connection = current_client.get().connection_id
        if name is None or connection in self.disks:
            return
        try:
            self.disks[connection] = await self._make()
        except OSError as exc:
            self.failed += 1
            who = current_client.get().address
            log.warning("tmpdisk: no disk for %s: %s", who, exc.strerror or exc)

    def for_export(self, name: str) -> Backend | None:
        return self.disks.get(current_client.get().connection_id)

    async def connection_ended(self) -> None:
        disk = self.disks.pop(current_client.get().connection_id, None)
        if disk is not None:
            disk.close()

    async def _make(self) -> DiskFile:
        """A new disk, open and already unlinked (its directory removed)."""
        folder = tempfile.mkdtemp(prefix="tmpdisk", dir=self.directory)
        path = os.path.join(folder, "disk")
        try:
            await make_disk(self.params, self.program, path)
            disk = DiskFile("")
            try:
                disk.open(path)
            except OSError as exc:
                raise OSError(exc.errno or errno.EIO, f"$disk: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
        self.made += 1
        return disk
