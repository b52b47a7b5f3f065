"""iso: a virtual CD-ROM, an ISO 9660 image made from one or more directories
(nbdkit-iso-plugin).

At start the node runs an mkisofs-like program over the directories, writing the image to a
file in $TMPDIR (default /var/tmp), and serves that image read-only (multi-conn offered: every
client reads the same bytes). The files and subdirectories of each DIR appear at the root of the
ISO; several directories are merged. What is in them is read once, at start: later changes are
not seen. The image is unlinked as soon as it is open: nothing is left in $TMPDIR, even if the
node is killed. The command run is, as nbdkit's, `PROG [-as mkisofs] -quiet PARAMS DIR...`,
through /bin/sh (so `params` is split and expanded by the shell: quote with care).

Params: `dir` (magic; repeatable, at least one: the directories), `params` (more options for
the program, such as `-JrT -V "My Disk"`: without Joliet or Rock Ridge, names are cut to ISO
9660's 8.3), `prog` (the program: default xorriso, else genisoimage, else mkisofs, whichever is
in PATH first; xorriso, by any path, is run as `xorriso -as mkisofs`).

Differences from nbdkit 1.32: nbdkit picks the default program when it is built (Debian's:
xorriso) and adds `-as mkisofs` to any `prog=` when built with xorriso (so `prog=genisoimage`
fails there); here the default is picked at start from PATH and `-as mkisofs` is added only to
xorriso. A `dir` that is not a directory stops the node (nbdkit passes a file on, which the
program adds to the root). A program that fails stops the node with its exit status and its
last words. Extents (the image's holes: none, as a rule) and cache are answered.

Example: `nbdfabric node iso /srv/cdrom params='-JrT -V CONFIG' --listen unix:/tmp/cd.sock`,
then `qemu-system-x86_64 -cdrom nbd+unix:///?socket=/tmp/cd.sock ...` or `nbdcopy
'nbd+unix:///?socket=/tmp/cd.sock' cd.iso`.
"""

from __future__ import annotations

import os
import shlex
import shutil
from typing import Any

from pydantic import model_validator

from ..params import Many, Params, param, repeated
from ..registry import register
from ._mkdisk import OUTPUT_TAIL, MadeImage, check_directory, run_script

#: The programs tried for the default, in nbdkit's order of preference.
PROGRAMS = ("xorriso", "genisoimage", "mkisofs")


class IsoParams(Params):
    dir: Many = repeated(
        "a directory whose files are at the ISO's root (at least one; several are merged)",
        path=True,
    )
    params: str | None = param(
        None, description="more options for the program, split by the shell (such as -JrT)"
    )
    prog: str | None = param(
        None, description="the mkisofs-like program (default: xorriso, genisoimage or mkisofs)"
    )

    @model_validator(mode="after")
    def _some_dir(self) -> IsoParams:
        if not self.dir:
            raise ValueError("'dir' is required: give dir=DIRECTORY (or bare directory names)")
        return self


def find_program(prog: str | None) -> str:
    """The program to run (as given, or the default found in PATH); ValueError if absent."""
    if prog is not None:
        if not prog or shutil.which(prog) is None:
            raise ValueError(
                f"bad value {prog!r} for 'prog': no such program in PATH (an mkisofs-like "
                "program: xorriso, genisoimage or mkisofs)"
            )
        return prog
    for name in PROGRAMS:
        if shutil.which(name) is not None:
            return name
    raise ValueError(
        "there is no xorriso, genisoimage or mkisofs in PATH to make the ISO: install xorriso, "
        "or name one with prog="
    )


@register
class Iso(MadeImage):
    """An ISO 9660 image made from directories by xorriso, genisoimage or mkisofs."""

    kind = "iso"
    Params = IsoParams
    magic = "dir"
    params: IsoParams

    def __init__(self, params: IsoParams) -> None:
        super().__init__(params)
        self.program = ""
        self.sources: list[str] = []

    async def check(self) -> None:
        self.program = find_program(self.params.prog)
        self.sources = [check_directory("dir", d) for d in self.params.dir]

    def command(self) -> str:
        """The shell command that writes the image to stdout (as nbdkit's)."""
        words = [self.program]
        if os.path.basename(self.program) == "xorriso":
            words += ["-as", "mkisofs"]
        words.append("-quiet")
        extra = f" {self.params.params}" if self.params.params else ""
        return f"{shlex.join(words)}{extra} {shlex.join(self.sources)}"

    async def make(self) -> None:
        # stderr to the pipe (kept for the message), then stdout to the image.
        script = f"{self.command()} 2>&1 >{shlex.quote(self.image)}"
        status, output = await run_script(script, capture=True)
        if status != 0:
            said = " ".join(output.decode(errors="replace").split())[-OUTPUT_TAIL:]
            raise ValueError(f"{self.command()}: exited with status {status}: {said}")

    def status(self) -> dict[str, Any]:
        return {"directories": self.sources, "program": self.program, "size": self.caps.size}
