"""extentlist: answer block status from a list of extents in a file, not from the upstream
(nbdkit-extentlist-filter).

For upstreams that cannot say which parts of the disk are allocated (an http or ssh source)
when that is known elsewhere (`xfs_bmap` or `filefrag` run on the machine that has the disk):
clients that skip holes (qemu-img convert, nbdcopy) then copy only the data. The upstream is
never asked about extents; `base:allocation` is offered even when the upstream has none.
Everything else, writes included, passes through unchanged, as in nbdkit: the list is read
once, at start, and never updated, so a client that writes into a listed hole may be told it
is still a hole. Serve the node with `--read-only` (nbdkit's manual says `-r`) unless clients
only read.

The file has one extent a line, `OFFSET LENGTH [TYPE]`:
    0   1M
    1M  9M  hole,zero
OFFSET and LENGTH are sizes as nbdkit writes them: a byte count, or with a suffix `b` (bytes),
`s` (512-byte sectors), `K`, `M`, `G`, `T`, `P` or `E` (powers of 1024); also `1.5M` or
`1MiB` as the other size params take them. TYPE is a number (0 allocated data, 1 hole, 2 reads
as zeros, 3 both: `base:allocation`'s flags), or a comma-separated list of the words `hole`
and `zero`; no TYPE is 0. The extents may come in any order and need not cover the disk
(whatever no line covers is a hole that reads as zeros, type 3), but must not overlap;
extents of length 0 are ignored and those past the end of the disk are cut there. A file that
breaks any of this stops the node at start (exit 1) with a message naming the file, the line
and what was expected there.

Param: `extentlist` (required; also the first bare word): the file.

Example: on the remote host `filefrag -e disk.raw` or `xfs_bmap -l disk.raw`, turned into
`OFFSET LENGTH` lines of its data in disk.extents, then
`nbdfabric node extentlist extentlist=disk.extents --read-only
--upstream nbd://bridge:10809/disk.raw` and `qemu-img convert` from it: the holes are not read.

Differences from nbdkit 1.32: blank lines and comments (`#` at the start of a line or after
whitespace) are allowed (nbdkit refuses the file); an unknown TYPE word, a TYPE number other
than 0-3 or a field after TYPE is refused naming the line (nbdkit ignores the word, serves
such a number as data and ignores what follows); sizes may also be written `1.5M` and `1MiB`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

from ..base import Backend, Capabilities, Extents, Filter
from ..params import Params, param
from ..protocol.constants import REPLY_EXTENTS, Extent
from ..registry import register
from ..values import MAX_SIZE, c_integer, parse_size
from ._linefile import BadLine, load

#: What no line covers: a hole that reads as zeros (nbdkit's manual: "gaps are assumed to be
#: holes").
GAP = int(Extent.HOLE | Extent.ZERO)
WORDS = {"hole": int(Extent.HOLE), "zero": int(Extent.ZERO)}

_SECTORS = re.compile(r"([0-9]+)[sS]", re.ASCII)


def parse_length(text: str) -> int:
    """A size as nbdkit_parse_size reads it (`1M`, `512b`, `8s`), or as parse_size does."""
    m = _SECTORS.fullmatch(text)
    n = int(m.group(1)) * 512 if m else parse_size(text)
    if n > MAX_SIZE:
        raise ValueError(f"a size must be between 0 and {MAX_SIZE}")
    return n


def parse_type(text: str) -> int:
    number = c_integer(text)
    if number is not None:
        if number > GAP:
            raise ValueError(f"type {text} is not one of 0-3 (1 hole, 2 zero, 3 both)")
        return number
    flags = 0
    for word in text.split(","):
        if word not in WORDS:
            raise ValueError(f"type {text!r}: expected a number 0-3 or the words hole,zero")
        flags |= WORDS[word]
    return flags


@dataclass(frozen=True)
class ExtentList:
    """The listed extents, sorted and disjoint: starts[i], ends[i] and types[i] of each."""

    starts: list[int]
    ends: list[int]
    types: list[int]


def parse_extent_list(lines: Iterator[tuple[int, list[str]]]) -> ExtentList:
    """An extent list from its (line number, fields) records (see _linefile.records)."""
    entries: list[tuple[int, int, int, int]] = []  # start, end, type, line
    for line, fields in lines:
        if len(fields) not in (2, 3):
            raise BadLine(line, f"expected `OFFSET LENGTH [TYPE]`, got {' '.join(fields)!r}")
        try:
            offset, length = parse_length(fields[0]), parse_length(fields[1])
            flags = parse_type(fields[2]) if len(fields) == 3 else 0
        except ValueError as exc:
            raise BadLine(line, f"{' '.join(fields)!r}: {exc}") from None
        if offset + length > MAX_SIZE:
            raise BadLine(line, f"the extent at {offset} of {length} bytes ends past {MAX_SIZE}")
        if length:
            entries.append((offset, offset + length, flags, line))
    entries.sort()
    for (_, end, _, before), (start, _, _, line) in pairwise(entries):
        if start < end:
            raise BadLine(line, f"the extent at {start} overlaps the one on line {before}")
    return ExtentList([e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])


class ExtentListParams(Params):
    extentlist: str = param(
        path=True,
        description="file of extents, one `OFFSET LENGTH [TYPE]` a line; gaps are holes",
        min_length=1,
    )


@register
class ExtentListFilter(Filter):
    """Answers block status from a file's list of extents; everything else passes through."""

    kind = "extentlist"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = ExtentListParams
    params: ExtentListParams
    magic = "extentlist"

    def __init__(self, params: ExtentListParams, next: Backend) -> None:
        super().__init__(params, next)
        self.list = ExtentList([], [], [])

    async def start(self) -> None:
        # Before the upstream: a bad list is said at once, without waiting for a connection.
        self.list = load("extentlist", self.params.extentlist, parse_extent_list)
        await super().start()

    def capabilities(self) -> Capabilities:
        return replace(self.next.capabilities(), extents=True)

    def status(self) -> dict[str, Any]:
        listed = self.list
        return {
            **self.next.status(),
            "extentlist": {
                "file": self.params.extentlist,
                "extents": len(listed.starts),
                "data_bytes": sum(
                    e - s
                    for s, e, t in zip(listed.starts, listed.ends, listed.types, strict=True)
                    if not t & Extent.HOLE
                ),
            },
        }

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        starts, ends, types = self.list.starts, self.list.ends, self.list.types
        end = offset + count
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0 or ends[i] <= offset:
            i += 1  # offset lies in the gap before extent i
        out: Extents = []
        pos = offset
        while pos < end and len(out) < REPLY_EXTENTS:
            if i < len(starts) and starts[i] <= pos:
                upto, flag = min(ends[i], end), types[i]
                i += 1
            else:
                upto, flag = min(starts[i] if i < len(starts) else end, end), GAP
            if out and out[-1][1] == flag:  # neighbours alike are one extent (REQ_ONE too)
                out[-1] = (out[-1][0] + upto - pos, flag)
            else:
                out.append((upto - pos, flag))
            pos = upto
        return out
