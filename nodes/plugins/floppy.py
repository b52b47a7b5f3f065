"""floppy: a virtual FAT32 disk made from a directory (nbdkit-floppy-plugin).

At start the node makes a FAT32 file system with mkfs.vfat (dosfstools) in a sparse file in
$TMPDIR (default /var/tmp) and copies the directory's tree into it with mtools (mmd, mcopy:
long file names, modification times kept). It serves a disk with an MBR partition table whose
one partition (type 0x0C, FAT32 with LBA), from 1 MiB on (sector 2048), is that file system.
Only directories and regular files are copied: symbolic links, sockets, devices and the like are
left out, as nbdkit does. The disk is read-only (multi-conn offered: every client reads the same
bytes); put a `cow` node over it for a writable one whose writes are thrown away. What is in DIR
is read once, at start; the image is unlinked as soon as it is open, so nothing is left in
$TMPDIR even if the node is killed.

Params: `dir` (magic; required: the directory), `label` (the volume label, up to 11 ASCII
characters; default NBDKITFLOPY), `size` (the whole disk's size, partition table included: the
file system is the rest after the first MiB, in whole sectors; default: about just enough for the
files, at least what a FAT32 needs).

Differences from nbdkit 1.32: nbdkit writes its own FAT32 with 16 KiB clusters, however few
(a file system of a few clusters, which fsck.fat warns of and mtools cannot read); here the
file system is a valid FAT32 by the specification, at least 65525 clusters (512 bytes each on
small disks), so a disk is at least about 34 MiB (sparse: what is not written takes no room)
and `size=` below that stops the node. Without `size=` the disk's size is our own estimate, so
it differs from nbdkit's; with it, both serve the same size. The volume serial number is
mkfs.vfat's (nbdkit: always 0102-0304). Names that differ only in case are one name in FAT: the
later file copied replaces the earlier.

Example: `nbdfabric node floppy /srv/drivers label=DRIVERS --listen unix:/tmp/f.sock`; then
`nbdcopy 'nbd+unix:///?socket=/tmp/f.sock' floppy.img` and `mdir -i floppy.img@@1M ::`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
from typing import Any

from pydantic import field_validator

from ..params import Params, Size, param
from ..registry import register
from ._mkdisk import OUTPUT_TAIL, MadeImage, check_directory, find_mkfs, run_script
from .partitioning import SECTOR, _boot_record, _mbr_entry, regions_at
from .split import Region

MiB = 1 << 20
#: Where the partition starts (sector 2048: 1 MiB, as nbdkit).
START_SECTOR = 2048
#: FAT32 by the specification: at least this many clusters (fewer is FAT16 to every reader).
MIN_CLUSTERS = 65525
#: The smallest file system made: MIN_CLUSTERS of 512 bytes, the FATs and reserved sectors.
MIN_FS = 33 * MiB
#: The partition type: FAT32 with LBA addressing.
MBR_FAT32_LBA = 0x0C
DEFAULT_LABEL = "NBDKITFLOPY"
#: Tries at growing a file system the files did not fit in.
MAX_TRIES = 8
#: What mtools says when the file system is full.
FULL = ("Disk full", "No free cluster", "No directory slots")


class FloppyParams(Params):
    dir: str = param(description="the directory whose files the disk holds", path=True)
    label: str = param(DEFAULT_LABEL, description="volume label (up to 11 ASCII characters)")
    size: Size | None = param(
        None,
        description="the whole disk's size (default: about just enough for the files)",
    )

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        if not value or len(value) > 11 or not value.isascii() or not value.isprintable():
            raise ValueError("a volume label is 1 to 11 printable ASCII characters")
        return value


def estimate(directory: str) -> int:
    """About the size of a FAT32 file system with 512-byte clusters holding `directory`'s
    files and directories: their clusters, their entries (with long names), the FATs' share,
    and an eighth more."""
    data = 0
    for root, dirs, files in os.walk(directory):
        entries = 2
        for name in dirs + files:
            entries += 2 + len(name) // 13
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    data += -(-st.st_size // 512) * 512
        data += -(-entries * 32 // 512) * 512
    data += data // 512 * 8  # two FATs of 4 bytes a cluster
    return max(MIN_FS, -(-(data * 9 // 8 + MiB) // MiB) * MiB)


@register
class Floppy(MadeImage):
    """An MBR disk whose one partition is a FAT32 file system made from a directory."""

    kind = "floppy"
    Params = FloppyParams
    magic = "dir"
    params: FloppyParams

    def __init__(self, params: FloppyParams) -> None:
        super().__init__(params)
        self.source = os.path.abspath(params.dir)
        self.program = ""
        self.fs_size = 0

    async def check(self) -> None:
        self.program = find_mkfs("vfat")
        self.source = check_directory("dir", self.params.dir)
        size = self.params.size
        if size is not None and size - START_SECTOR * SECTOR < MIN_FS:
            raise ValueError(
                f"bad value {size} for 'size': a FAT32 disk here is at least "
                f"{MIN_FS + START_SECTOR * SECTOR} bytes (1 MiB for the partition table, "
                f"{MIN_FS} for {MIN_CLUSTERS} clusters)"
            )

    def layout(self, sizes: list[int]) -> list[Region]:
        (fs_size,) = sizes
        sectors = fs_size // SECTOR
        table = _boot_record([_mbr_entry(0, MBR_FAT32_LBA, START_SECTOR, sectors)])
        places: list[tuple[int, bytes | int]] = [
            (0, table),
            (START_SECTOR, 0),
            (START_SECTOR + sectors, b""),
        ]
        return regions_at(places, sizes, self.files)

    async def make(self) -> None:
        size = self.params.size
        if size is not None:
            fs = (size - START_SECTOR * SECTOR) // SECTOR * SECTOR
            if not await self._try(fs):
                raise ValueError(
                    f"bad value {size} for 'size': the files of {self.params.dir} do not fit"
                )
            return
        fs = estimate(self.source)
        for _ in range(MAX_TRIES):
            if await self._try(fs):
                return
            fs = -(-(fs * 3 // 2) // MiB) * MiB
        raise ValueError(f"dir={self.params.dir}: the files did not fit in {fs} bytes")

    async def _try(self, size: int) -> bool:
        """A FAT32 of `size` bytes at self.image holding the tree: True, or False if the files
        did not fit; ValueError with the tool's words on any other failure."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.image)
        fd = os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        # 512-byte clusters while 4K ones would be too few for FAT32, else mkfs.vfat's choice.
        small = size < (MIN_CLUSTERS + 1024) * 4096
        mkfs = [self.program, "-F", "32", *(["-s", "1"] if small else []), "-n", self.params.label]
        status, output = await run_script(f"exec {shlex.join([*mkfs, self.image])} 2>&1", True)
        if status != 0:
            said = " ".join(output.decode(errors="replace").split())[-OUTPUT_TAIL:]
            raise ValueError(f"mkfs.vfat exited with status {status}: {said}")
        status, output = await run_script(self._copy_script(), capture=True)
        said = " ".join(output.decode(errors="replace").split())[-OUTPUT_TAIL:]
        if status == 0:
            self.fs_size = size
            return True
        if any(words in said for words in FULL):
            return False
        raise ValueError(f"mtools could not copy {self.params.dir} (status {status}): {said}")

    def _copy_script(self) -> str:
        """mmd and mcopy, a call per directory: its subdirectories, then its regular files."""
        image = shlex.quote(self.image)
        lines = ["set -e", "export MTOOLSRC=/dev/null", "exec 2>&1"]
        for root, dirs, files in os.walk(self.source):
            rel = os.path.relpath(root, self.source)
            target = "::/" if rel == "." else f"::/{rel}/"
            subdirs = [d for d in sorted(dirs) if not os.path.islink(os.path.join(root, d))]
            dirs[:] = subdirs  # os.walk goes into these only
            regular = [
                os.path.join(root, f)
                for f in sorted(files)
                if stat.S_ISREG(os.lstat(os.path.join(root, f)).st_mode)
            ]
            if subdirs:
                made = [target + d for d in subdirs]
                lines.append(f"mmd -D o -i {image} {shlex.join(made)}")
            if regular:
                lines.append(
                    f"mcopy -D o -m -i {image} {shlex.join(regular)} {shlex.quote(target)}"
                )
        return "\n".join(lines) + "\n"

    def status(self) -> dict[str, Any]:
        return {"directory": self.source, "fs_size": self.fs_size, "size": self.caps.size}
