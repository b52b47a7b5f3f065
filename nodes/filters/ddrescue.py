"""ddrescue: serve a disk image GNU ddrescue rescued, failing reads of what it did not rescue
(nbdkit-ddrescue-filter).

The upstream holds the image ddrescue wrote; `ddrescue-mapfile` is the mapfile it kept beside
it. A read that lies wholly inside the blocks the mapfile marks finished (`+`) passes through;
any other read fails with EIO, as the bad sectors of the original disk did, where the image
holds whatever was there before (zeros, mostly, which a filesystem checker takes for data).
Bytes past the mapfile's last block were not rescued either. Use it to find which files or
filesystem structures the bad sectors hit, or to run a checker against what was rescued.

As nbdkit 1.32's: the export is read-only and offers no cache (a cache request would have the
upstream prefetch sectors that reads refuse); size, flush, multi-conn and block status are the
upstream's. The mapfile is read once, when the node starts.

The mapfile is GNU ddrescue's format, as ddrescue writes it:
    # Mapfile. Created by GNU ddrescue version 1.27
    # current_pos  current_status  current_pass
    0x00120000     ?               1
    #      pos        size  status
    0x00000000  0x00117000  +
    0x00117000  0x00000200  -
    0x00117200  0x00001000  /
    0x00118200  0x00007E00  *
    0x00120000  0x00048000  ?
`#` at the start of a line or after whitespace starts a comment; blank lines are skipped. The
first other line is the status line: the position being tried, the phase (one of `?*/-FG+`)
and the pass (a positive decimal number; older versions of ddrescue wrote none). Every
later line is a block, `POS SIZE STATUS`, its STATUS one of `?` non-tried, `*` non-trimmed,
`/` non-scraped, `-` bad sector(s), `+` finished. Numbers are written as C++ integers: decimal,
`0x` hexadecimal or `0` octal. The blocks must come in order, each starting where the one
before ended. A mapfile that breaks any of this stops the node at start (exit 1) with a
message naming the file, the line and what was expected there.

Param: `ddrescue-mapfile` (required; also the first bare word): the mapfile.

Example: `nbdfabric node file disk.img --listen unix:/tmp/image.sock`, then
`nbdfabric node ddrescue ddrescue-mapfile=disk.map --upstream 'nbd+unix:///?socket=/tmp/image.sock'
--listen unix:/tmp/rescued.sock` and `qemu-img convert -n ...` or a read-only fsck through the
kernel's nbd client: every unrescued sector reads as an I/O error.

Differences from nbdkit 1.32, whose parser is lenient where a wrong guess serves wrong data:
nbdkit skips lines it cannot parse, takes the first block for the status line when that line is
missing (so the first block's status is lost), accepts blocks out of order or overlapping, and
takes an unknown status character for "not finished"; here each of these is a start-up error
naming the line. nbdkit also fails a read that spans two adjacent finished blocks (it checks
each line alone); here adjacent finished blocks are one rescued run. ddrescue writes its
mapfiles with neighbours of the same status merged, so the mapfiles it writes read alike in
both.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..base import Backend, Capabilities, Filter, Holes, Support
from ..params import Params, param
from ..registry import register
from ..values import MAX_SIZE, c_integer
from ._linefile import BadLine, load

#: The phases a status line may name (ddrescue's manual, "Mapfile structure").
PHASES = {
    "?": "copying non-tried blocks",
    "*": "trimming non-trimmed blocks",
    "/": "scraping non-scraped blocks",
    "-": "retrying bad sectors",
    "F": "filling the blocks specified",
    "G": "generating an approximate mapfile",
    "+": "finished",
}
#: The states a block may be in.
STATES = {
    "?": "non-tried",
    "*": "non-trimmed",
    "/": "non-scraped",
    "-": "bad sector(s)",
    "+": "finished",
}
FINISHED = "+"


@dataclass(frozen=True)
class Mapfile:
    """What a mapfile says: the status line, and the rescued bytes as sorted, disjoint,
    non-touching [start, end) runs."""

    position: int
    phase: str
    rescued: list[tuple[int, int]]
    end: int  #: where the last block ends (0: no blocks)
    blocks: int


def _number(line: int, what: str, text: str) -> int:
    value = c_integer(text)
    if value is None:
        raise BadLine(line, f"{what} {text!r} is not a number (decimal, 0x hex or 0 octal)")
    if value > MAX_SIZE:
        raise BadLine(line, f"{what} {text} is past the largest offset, {MAX_SIZE}")
    return value


def _status_line(line: int, fields: list[str]) -> tuple[int, str]:
    expected = f"expected the status line `POS PHASE [PASS]`, PHASE one of {''.join(PHASES)}"
    if len(fields) not in (2, 3) or fields[1] not in PHASES:
        hint = ""
        if len(fields) == 3 and fields[2] in STATES:  # a block: ddrescue before 1.6 wrote none
            hint = " (this looks like a block: put a status line such as `0 +` before it)"
        raise BadLine(line, f"{expected}, got {' '.join(fields)!r}{hint}")
    position = _number(line, "position", fields[0])
    if len(fields) == 3 and not (fields[2].isdigit() and fields[2].isascii() and int(fields[2])):
        raise BadLine(line, f"{expected}: PASS {fields[2]!r} is not a positive decimal number")
    return position, fields[1]


def parse_mapfile(lines: Iterator[tuple[int, list[str]]]) -> Mapfile:
    """A mapfile from its (line number, fields) records (see _linefile.records)."""
    first = next(lines, None)
    if first is None:
        raise BadLine(None, "no status line: this is no ddrescue mapfile (it is empty)")
    position, phase = _status_line(*first)
    rescued: list[tuple[int, int]] = []
    end, end_line, blocks = 0, 0, 0
    for line, fields in lines:
        if len(fields) != 3 or fields[2] not in STATES:
            raise BadLine(
                line,
                f"expected a block `POS SIZE STATUS`, STATUS one of {''.join(STATES)}, "
                f"got {' '.join(fields)!r}",
            )
        pos = _number(line, "block position", fields[0])
        size = _number(line, "block size", fields[1])
        if blocks and pos != end:
            how = "overlaps" if pos < end else "leaves a gap after"
            raise BadLine(
                line,
                f"the block at {pos:#x} {how} the one on line {end_line}, which ends at "
                f"{end:#x}: blocks must be in order, each starting where the last one ended",
            )
        if pos + size > MAX_SIZE:
            raise BadLine(line, f"the block at {pos:#x} of {size:#x} bytes ends past {MAX_SIZE}")
        if fields[2] == FINISHED and size:
            if rescued and rescued[-1][1] == pos:
                rescued[-1] = (rescued[-1][0], pos + size)
            else:
                rescued.append((pos, pos + size))
        end, end_line, blocks = pos + size, line, blocks + 1
    return Mapfile(position, phase, rescued, end, blocks)


class DdrescueParams(Params):
    ddrescue_mapfile: str = param(
        path=True,
        description="GNU ddrescue's mapfile of the image: reads outside its finished (+) "
        "blocks fail with EIO",
        min_length=1,
    )


@register
class Ddrescue(Filter):
    """Serves a rescued image read-only; reads of what ddrescue did not rescue fail with EIO."""

    kind = "ddrescue"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = DdrescueParams
    params: DdrescueParams
    magic = "ddrescue-mapfile"

    def __init__(self, params: DdrescueParams, next: Backend) -> None:
        super().__init__(params, next)
        self.map = Mapfile(0, "?", [], 0, 0)
        self._starts: list[int] = []
        self.refused = 0

    async def start(self) -> None:
        # Before the upstream: a bad mapfile is said at once, without waiting for a connection.
        self.map = load("ddrescue-mapfile", self.params.ddrescue_mapfile, parse_mapfile)
        self._starts = [start for start, _ in self.map.rescued]
        await super().start()

    def capabilities(self) -> Capabilities:
        caps = replace(self.next.capabilities(), writable=False, cache=Support.NONE)
        return caps.normalized()

    def status(self) -> dict[str, Any]:
        return {
            **self.next.status(),
            "ddrescue": {
                "mapfile": self.params.ddrescue_mapfile,
                "phase": PHASES[self.map.phase],
                "rescued_bytes": sum(end - start for start, end in self.map.rescued),
                "rescued_runs": len(self.map.rescued),
                "mapped_bytes": self.map.end,
                "refused_reads": self.refused,
            },
        }

    def unrescued(self, count: int, offset: int) -> int | None:
        """The first byte of [offset, offset+count) ddrescue did not rescue, or None."""
        if count == 0:
            return None
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return offset
        end = self.map.rescued[i][1]
        if end >= offset + count:
            return None
        return max(end, offset)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        bad = self.unrescued(len(buf), offset)
        if bad is not None:
            self.refused += 1
            raise OSError(errno.EIO, f"ddrescue: byte {bad} was not rescued (mapfile)")
        return await self.next.pread(buf, offset, flags)
