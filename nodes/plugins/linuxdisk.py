"""linuxdisk: a virtual disk holding an ext2, ext3 or ext4 file system made from a directory
(nbdkit-linuxdisk-plugin).

At start the node makes the file system with `mke2fs -d DIR` (e2fsprogs) in a sparse file in
$TMPDIR (default /var/tmp): the files and subdirectories of DIR become the root of the file
system, with their modes, owners, times, hard and symbolic links and special files as mke2fs
copies them. It then serves a disk partitioned with GPT whose one partition, from 1 MiB on
(sector 2048), is that file system: a protective MBR, the GPT header and its 128-entry array
before it, the backup array and header after it (the partitioning plugin's GPT, with the Linux
file system data type, the "legacy BIOS bootable" attribute and no name). The disk is read-only,
so any number of clients can read it at once (multi-conn is offered); put a `cow` node over it
for a writable one (one client at a time, as nbdkit's manual warns). What is in DIR is read once,
at start: later changes to DIR are not seen. The file system's image is unlinked as soon as it
is open: nothing is left in $TMPDIR, even if the node is killed.

Params: `dir` (magic; required: the directory), `type` (ext2 | ext3 | ext4, default ext2),
`label` (the file system's label, none by default), `size`: `SIZE` for the file system's size
(rounded up to whole 512-byte sectors; the disk is 1 MiB and 33 sectors more; too small for
the files stops the node with mke2fs's message), `+SIZE` for at least that much free space for
users after the files are in (blocks reserved for root not counted), or none for about just
enough room.

Differences from nbdkit 1.32: the partition's type GUID is the Linux file system data type
0FC63DAF-8483-4772-8E79-3D69D8477DE4 (nbdkit 1.32 stores the GUID's text as bytes, a type no
tool knows); the disk and partition GUIDs are random (nbdkit's disk GUID is all zeros). Without
`size`, or with `+SIZE`, the file system's size is our own estimate, grown until the files (and
the free space asked for) fit, so it may differ from nbdkit's (nbdkit gives ext3/ext4 32 MiB
more); with `size=SIZE` both make the same disk size and layout. Trim, zero and flush are not
offered (read-only); cache is (posix_fadvise), and extents (the image's holes) are answered.

Example: `nbdfabric node linuxdisk /srv/rootfs label=ROOTFS type=ext4 --listen
unix:/tmp/l.sock`, then `nbdcopy 'nbd+unix:///?socket=/tmp/l.sock' disk.img` copies the disk;
a `partition` node (partition=1) over it serves the bare file system, which `nbdcopy` to a file
gives e2fsck, debugfs or mount as it is.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
import struct
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator

from ..params import Params, param
from ..registry import register
from ..values import parse_size
from ._mkdisk import MadeImage, check_directory, find_mkfs, run_script
from .partitioning import (
    DEFAULT_ALIGNMENT,
    DEFAULT_TYPE_GUID,
    GPT_BIOS_BOOTABLE,
    SECTOR,
    GptPartition,
    gpt_places,
    regions_at,
)
from .split import Region

MiB = 1 << 20
#: Tries at growing a file system the files (or the free space asked for) did not fit in.
MAX_TRIES = 10
#: What mke2fs -d says when the file system is too small for the files.
TOO_SMALL = ("Could not allocate", "No free space", "No space left")
#: Room ext3 and ext4 need for their journal on a small file system (mke2fs's default for
#: file systems up to 256 MiB of 1K blocks is 4096 blocks).
JOURNAL = 4 * MiB
#: ext2/3/4 superblock: where it is, and its block counts (low 32 bits), block size, features.
SUPERBLOCK = 1024
SB_COUNTS = struct.Struct("<4xIII8xI")  # blocks, reserved, free, (...), log2(block size) - 10
SB_INCOMPAT = 0x60
INCOMPAT_64BIT = 0x80
SB_COUNTS_HI = struct.Struct("<III")  # at 0x150: the high 32 bits of the three counts
SB_COUNTS_HI_AT = 0x150


def _size_spec(value: Any) -> str:
    """`SIZE` (bytes, as digits) or `+SIZE` (`+` and bytes): what size= asks for."""
    if isinstance(value, str) and value.startswith("+"):
        return f"+{parse_size(value[1:])}"
    n = parse_size(value)
    if n == 0:
        raise ValueError("a file system needs room: give SIZE, +SIZE (free space) or no size")
    return str(n)


SizeSpec = Annotated[str, BeforeValidator(_size_spec)]


class LinuxdiskParams(Params):
    dir: str = param(description="the directory whose files the file system holds", path=True)
    type: Literal["ext2", "ext3", "ext4"] = param("ext2", description="file system type")
    label: str | None = param(None, description="file system label (default none)")
    size: SizeSpec | None = param(
        None,
        description="SIZE: the file system's size; +SIZE: at least this much free space after "
        "the files (default: about just enough room)",
    )


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def estimate(directory: str) -> int:
    """About the size of an ext2 file system that holds `directory`'s tree: its files' data
    in 4K blocks, a block per directory and per long symbolic link, and a 4K inode's share per
    file (the default inode ratio of small file systems), with a quarter more for the rest of
    the metadata and the blocks reserved for root."""
    data, inodes, seen = 0, 0, set()
    for root, dirs, files in os.walk(directory):
        data += 4096
        inodes += 1
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) in seen:  # another hard link: no more room
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode):
                data += _round_up(st.st_size, 4096)
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                data += 4096
    return (data + inodes * 4096) * 5 // 4


def available(image: str) -> int:
    """Free bytes for users (not root's reserved blocks) in the ext file system `image`."""
    with open(image, "rb") as f:
        f.seek(SUPERBLOCK)
        sb = f.read(1024)
    _, reserved, free, log_size = SB_COUNTS.unpack_from(sb)
    (incompat,) = struct.unpack_from("<I", sb, SB_INCOMPAT)
    if incompat & INCOMPAT_64BIT:
        hi = SB_COUNTS_HI.unpack_from(sb, SB_COUNTS_HI_AT)
        reserved, free = reserved | hi[1] << 32, free | hi[2] << 32
    return max(0, free - reserved) * (1024 << log_size)


@register
class LinuxDisk(MadeImage):
    """A GPT disk whose one partition is an ext2/3/4 file system made from a directory."""

    kind = "linuxdisk"
    Params = LinuxdiskParams
    magic = "dir"
    params: LinuxdiskParams

    def __init__(self, params: LinuxdiskParams) -> None:
        super().__init__(params)
        self.source = os.path.abspath(params.dir)
        self.program = ""
        self.fs_size = 0

    def layout(self, sizes: list[int]) -> list[Region]:
        (fs_size,) = sizes
        partition = GptPartition(
            sectors=fs_size // SECTOR,
            alignment=DEFAULT_ALIGNMENT,
            type_guid=DEFAULT_TYPE_GUID,
            guid=os.urandom(16),
            name=bytes(72),
            attributes=GPT_BIOS_BOOTABLE,
        )
        return regions_at(gpt_places([partition], os.urandom(16)), sizes, self.files)

    async def check(self) -> None:
        self.program = find_mkfs(self.params.type)
        self.source = check_directory("dir", self.params.dir)

    async def make(self) -> None:
        await self._make(self.program)

    def status(self) -> dict[str, Any]:
        return {
            "directory": self.source,
            "type": self.params.type,
            "fs_size": self.fs_size,
            "size": self.caps.size,
        }

    async def _make(self, program: str) -> None:
        """The file system, at self.image: of the size asked for, or grown until it fits."""
        spec = self.params.size
        if spec is not None and not spec.startswith("+"):
            await self._mke2fs(program, _round_up(int(spec), SECTOR), grow=False)
            return
        want_free = int(spec[1:]) if spec is not None else 0
        journal = JOURNAL if self.params.type != "ext2" else 0
        size = _round_up(max(estimate(self.source) + want_free + journal, MiB), MiB)
        for _ in range(MAX_TRIES):
            if await self._mke2fs(program, size, grow=True):
                lacking = want_free - available(self.image)
                if lacking <= 0:
                    return
                size = _round_up(size + lacking + lacking // 4, MiB)
            else:
                size = _round_up(size * 3 // 2, MiB)
        raise ValueError(f"dir={self.params.dir}: the files did not fit in {size} bytes")

    async def _mke2fs(self, program: str, size: int, grow: bool) -> bool:
        """mke2fs -d into a new image of `size` bytes: True if done, False if too small (when
        we may `grow` it), else ValueError with mke2fs's words."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.image)
        fd = os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        p = self.params
        argv = [program, "-q", "-F", "-t", p.type, "-d", self.source]
        if p.label:
            argv += ["-L", p.label]
        status, output = await run_script(f"exec {shlex.join([*argv, self.image])} 2>&1", True)
        said = " ".join(output.decode(errors="replace").split())
        if status == 0:
            self.fs_size = size
            return True
        if grow and any(words in said for words in TOO_SMALL):
            return False
        what = f"size={p.size}: " if p.size is not None else ""
        raise ValueError(f"{what}mke2fs -d {p.dir} failed (status {status}): {said}")
