"""Text files of one record a line that a filter reads when it starts (ddrescue's mapfile,
extentlist's list): comments and blank lines skipped, and errors that name the param, the file
and the line, so that `nbdfabric node` can say exactly what to fix and exit 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TypeVar

#: The longest line read (a mapfile's comments hold ddrescue's command line): a param naming
#: /dev/zero or a binary file is refused at this, not read into memory whole.
MAX_LINE = 64 * 1024

# A comment starts with '#' at the start of a line or after whitespace (GNU ddrescue's rule).
_COMMENT = re.compile(rb"(?:^|(?<=\s))#")

T = TypeVar("T")


class BadLine(ValueError):
    """What is wrong with line `line` of the file (None: with the file as a whole)."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line


def records(key: str, path: str) -> Iterator[tuple[int, list[str]]]:
    """(line number from 1, whitespace-separated fields) of each line that has any fields once
    its comment is cut off. OSError (naming the param) if the file cannot be read."""
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
                if len(raw) > MAX_LINE:
                    raise BadLine(number, f"longer than {MAX_LINE} bytes: is this a text file?")
                comment = _COMMENT.search(raw)
                if comment is not None:
                    raw = raw[: comment.start()]
                try:
                    text = raw.decode("ascii")
                except UnicodeDecodeError:
                    raise BadLine(number, "not ASCII text (outside a comment)") from None
                fields = text.split()
                if fields:
                    yield number, fields
    except OSError as exc:
        raise OSError(exc.errno, f"{key}={path}: {exc.strerror}") from None


def load(key: str, path: str, parse: Callable[[Iterator[tuple[int, list[str]]]], T]) -> T:
    """`parse(records(key, path))`, its BadLine turned into a ValueError that names the param,
    the file and the line (what `nbdfabric node` prints before it exits 1)."""
    try:
        return parse(records(key, path))
    except BadLine as exc:
        where = f", line {exc.line}" if exc.line is not None else ""
        raise ValueError(f"{key}={path}{where}: {exc}") from None
