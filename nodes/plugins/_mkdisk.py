"""What the plugins that make disks share: for their clients (tmpdisk, ondemand): their params,
making a disk (mkfs on a sparse file, or the user's command=), and serving one from its open
file; once at start from a directory (linuxdisk, iso, floppy): MadeImage, an image made in a
folder of $TMPDIR, unlinked once open and served read-only.

A disk is made at a path that does not exist yet: either a sparse file of `size` bytes that
mkfs.TYPE formats (with the label, if given), or whatever `command=` makes there, a shell script
run with `$disk` (the path), `$size` (bytes), and as shell variables the `type=`, `label=` and
`VAR=VALUE` params given (not exported, as nbdkit sets them). mkfs's own output is kept for the
error message; a command's goes to the node's stderr.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import shutil
import stat
import tempfile
from dataclasses import replace
from typing import Any

from pydantic import ConfigDict, field_validator, model_validator

from ..base import Capabilities
from ..params import Params, Size, did_you_mean, field_info, param
from ..spawn import DEVNULL, PIPE, shell
from .file import File, FileParams
from .split import FileLayout, Region

#: Where disks are made when TMPDIR is not set (nbdkit's LARGE_TMPDIR: /tmp is often a small
#: tmpfs, too small for disks).
LARGE_TMPDIR = "/var/tmp"
#: Where mkfs programs are looked for after PATH (a user's PATH often lacks the sbin ones).
SBIN = ("/usr/sbin", "/sbin")
#: mkfs.TYPE's options: those that make it format a file without asking, and the one that
#: sets the label (None: the type has no label). Types not here get none and `-L`.
MKFS_STYLE: dict[str, tuple[tuple[str, ...], str | None]] = {
    "ext2": (("-F", "-q"), "-L"),
    "ext3": (("-F", "-q"), "-L"),
    "ext4": (("-F", "-q"), "-L"),
    "xfs": (("-f", "-q"), "-L"),
    "btrfs": (("-f", "-q"), "-L"),
    "vfat": (("-I",), "-n"),
    "fat": (("-I",), "-n"),
    "msdos": (("-I",), "-n"),
    "exfat": ((), "-L"),
    "ntfs": (("-F", "-Q", "-q"), "-L"),
    "f2fs": (("-f", "-q"), "-l"),
    "minix": ((), None),
}
#: Which package has each type's mkfs on Debian (for the message when it is missing).
MKFS_PACKAGE = {
    "ext2": "e2fsprogs",
    "ext3": "e2fsprogs",
    "ext4": "e2fsprogs",
    "xfs": "xfsprogs",
    "btrfs": "btrfs-progs",
    "vfat": "dosfstools",
    "fat": "dosfstools",
    "msdos": "dosfstools",
    "exfat": "exfatprogs",
    "ntfs": "ntfs-3g",
    "f2fs": "f2fs-tools",
}
#: The params that become shell variables of command= when given (besides VAR=VALUE ones).
SCRIPT_PARAMS = ("type", "label")
#: The tail of mkfs's output kept for an error message.
OUTPUT_TAIL = 2000
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FS_TYPE = re.compile(r"[A-Za-z0-9_]+")


class DiskParams(Params):
    """size, type, label, command=, and with command= any VAR=VALUE (a variable of its script)."""

    model_config = ConfigDict(extra="allow")

    size: Size = param(
        description="virtual size of each disk (with command=: what $size says; the disk "
        "the command makes has the size it has)"
    )
    type: str = param("ext4", description="file system type: mkfs.TYPE formats each disk")
    label: str | None = param(None, description="file system label (default none)")
    command: str | None = param(
        None,
        description='shell script that makes the disk at "$disk" instead of mkfs ($size, '
        "$type, $label and VAR=VALUE params are its variables)",
    )

    @field_validator("type")
    @classmethod
    def _type_word(cls, value: str) -> str:
        if not _FS_TYPE.fullmatch(value):
            raise ValueError("expected a file system type such as ext4, xfs, vfat or btrfs")
        return value

    @model_validator(mode="after")
    def _variables_only_with_command(self) -> DiskParams:
        extra = self.model_extra or {}
        names = ", ".join(e["name"] for e in field_info(type(self)))
        for key, value in extra.items():
            if self.command is None:
                hint = did_you_mean(key, (e["name"] for e in field_info(type(self))))
                raise ValueError(
                    f"unknown parameter '{key}'{hint} (accepts: {names}; other KEY=VALUE "
                    "params only with command=, whose script has them as variables)"
                )
            if key == "disk":
                raise ValueError(
                    "parameter 'disk' cannot be set: $disk is the path the node gives command="
                )
            if not _SHELL_NAME.fullmatch(key):
                raise ValueError(
                    f"parameter '{key}': a variable of command= needs a shell variable name "
                    "(letters, digits and _, not starting with a digit)"
                )
            if not isinstance(value, str | int | float | bool):
                raise ValueError(f"parameter '{key}': a variable of command= takes one value")
        if self.command is None and self.size == 0:
            raise ValueError(
                "bad value '0' for 'size': a file system needs room (size=0 only with "
                "command=, where the disk it makes has its own size)"
            )
        return self

    def script_variables(self) -> dict[str, str]:
        """The shell variables of command= besides $disk and $size: the params given."""
        given = {k: getattr(self, k) for k in SCRIPT_PARAMS if k in self.model_fields_set}
        extra = {k: _shell_text(v) for k, v in (self.model_extra or {}).items()}
        return {k: str(v) for k, v in given.items() if v is not None} | extra


def _shell_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def temp_directory() -> str:
    """Where temporary disks are made: $TMPDIR, else /var/tmp (as nbdkit)."""
    return os.environ.get("TMPDIR") or LARGE_TMPDIR


def check_temp_directory(path: str) -> None:
    """ValueError unless disks can be made in `path` (a directory we may write)."""
    if not os.path.isdir(path):
        raise ValueError(f"{path} (TMPDIR): not a directory; set TMPDIR to one for the disks")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{path} (TMPDIR): no permission to make disks there; set TMPDIR")


def find_mkfs(fs_type: str) -> str:
    """The path of mkfs.TYPE (PATH, then /usr/sbin and /sbin); ValueError naming the package
    to install if there is none."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    found = shutil.which(f"mkfs.{fs_type}", path=search)
    if found is None:
        package = MKFS_PACKAGE.get(fs_type)
        how = f"install {package}" if package else "install its tools, or use command="
        raise ValueError(
            f"bad value {fs_type!r} for 'type': there is no mkfs.{fs_type} (looked in PATH, "
            f"/usr/sbin and /sbin): {how}"
        )
    return found


def check_params(params: DiskParams) -> str | None:
    """At start: what making a disk needs is there (mkfs.TYPE; a label it can set). The path of
    mkfs.TYPE, None with command=."""
    if params.command is not None:
        return None
    program = find_mkfs(params.type)
    if params.label and MKFS_STYLE.get(params.type, ((), "-L"))[1] is None:
        raise ValueError(f"bad value for 'label': a {params.type} file system has no label")
    return program


def mkfs_argv(program: str, params: DiskParams, path: str) -> list[str]:
    flags, label_flag = MKFS_STYLE.get(params.type, ((), "-L"))
    argv = [program, *flags]
    if params.label and label_flag is not None:
        argv += [label_flag, params.label]
    return [*argv, path]


async def make_disk(params: DiskParams, program: str | None, path: str) -> None:
    """Make the disk at `path` (which must not exist): mkfs `program` on a sparse file of
    params.size bytes, or params.command. OSError saying what failed; on any failure or
    cancellation the processes started are killed (the caller removes what is left at
    `path`)."""
    if params.command is None:
        assert program is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            os.ftruncate(fd, params.size)
        finally:
            os.close(fd)
        argv = mkfs_argv(program, params, path)
        status, output = await run_script(f"exec {shlex.join(argv)} 2>&1", capture=True)
        if status != 0:
            said = " ".join(output.decode(errors="replace").split())[-OUTPUT_TAIL:]
            raise OSError(errno.EIO, f"mkfs.{params.type} exited with status {status}: {said}")
        return
    assignments = {"disk": path, "size": str(params.size), **params.script_variables()}
    script = "".join(f"{k}={shlex.quote(v)}\n" for k, v in assignments.items())
    status, _ = await run_script(script + params.command, capture=False)
    if status != 0:
        raise OSError(errno.EIO, f"command= exited with status {status}")
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise OSError(errno.ENOENT, "command= made nothing at $disk") from None


async def run_script(script: str, capture: bool) -> tuple[int, bytes]:
    """Run `script` with /bin/sh in a process group of its own (stdin: nothing; stdout: kept
    when `capture`, else the node's stderr): its exit status and the tail of its output. If
    the wait is cancelled (the client left), the group is killed."""
    child = await shell(script, stdin=DEVNULL, stdout=PIPE if capture else 2, new_session=True)
    try:
        tail = b""
        if child.stdout is not None:
            while chunk := await child.stdout.read(65536):
                tail = (tail + chunk)[-OUTPUT_TAIL:]
        return await child.wait(), tail
    except BaseException:
        child.kill_group()
        raise


class DiskFile(File):
    """A disk made for clients, served from its open file as the file plugin serves one. One
    client at a time has it (tmpdisk: its own; ondemand: locked), so multi-conn is not
    offered: a client that opened more connections would write to other disks, or be
    refused."""

    def __init__(self, name: str) -> None:
        super().__init__(FileParams(file=name))
        self.name = name  #: the export's canonical name

    def capabilities(self) -> Capabilities:
        return replace(super().capabilities(), multi_conn=False)

    def export_identity(self, requested: str) -> tuple[str, str]:
        return self.name, ""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_directory(key: str, path: str) -> str:
    """The absolute path of the directory `path` (param `key`); OSError naming both if it is
    not one."""
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    except OSError as exc:
        raise OSError(exc.errno, f"{key}={path}: {exc.strerror}") from None
    return os.path.abspath(path)


class MadeImage(FileLayout):
    """A disk image made once, at start, in a folder of its own in $TMPDIR (default /var/tmp),
    then opened, unlinked (nothing is left behind, even if the node is killed) and served
    read-only (multi-conn offered: every client reads the same bytes). A kind says how to make
    it (`make`, at self.image, which does not exist yet) and may lay the disk out around it
    (`layout`; by default the image is the whole disk)."""

    #: One image per node: workers would each make their own (other UUIDs, times).
    shareable = False

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.image = ""

    def paths(self) -> list[str]:
        return [self.image]

    def layout(self, sizes: list[int]) -> list[Region]:
        return [Region(0, sizes[0], self.files[0])]

    async def check(self) -> None:
        """Before anything is made: ValueError/OSError if the params cannot work."""

    async def make(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        await self.check()
        directory = temp_directory()
        check_temp_directory(directory)
        folder = tempfile.mkdtemp(prefix=self.kind, dir=directory)
        try:
            self.image = os.path.join(folder, "disk.img")
            await self.make()
            await super().start()  # opens the image and lays the disk out
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)  # the open image lives on as long as it is served
        # Not rotational, as nbdkit's: the image is a temporary, whatever disk $TMPDIR is on.
        self.caps = replace(self.caps, writable=False, flush=False, rotational=False).normalized()
