"""The `data=` format of nbdkit's data plugin, parsed into the image it describes (sans-IO).

A string of fields laid down one after another from offset 0 (nbdkit-data-plugin(1), DATA
FORMAT): bytes (`0`, `0x55`, `017`), words (`le16:0xaa55`, `be32:1`, ... up to 64 bits),
`"strings"` with C escapes, offset moves (`@0x1fe`, `@+N`, `@-N`, `@^ALIGNMENT`), groups
`( ... )` whose offsets are relative to their own start, and after any of those: repetition
`* N`, slices `[start:end]`, and naming `-> \\name` (then `\\name` lays it down again, in the
same scope or a nested one). `<FILE` lays down a file's bytes. The image's size is the furthest
offset reached, by bytes or by moves.

Not supported (a clear error instead): `<(SCRIPT)` (running programs from a parameter) and
`$VAR` substitution.

An image is a list of chunks (offset, bytes or a run of one byte value) in the order they were
laid down, a later one overriding an earlier one where they overlap; a run keeps `0 * 1G` or
`( 0x55 ) * 1000000` from taking that much memory while parsing.
"""

from __future__ import annotations

import re
from collections import ChainMap
from dataclasses import dataclass, field
from pathlib import Path

from ..values import c_integer

#: The most bytes a `data=` string may spell out (runs of one value are not counted).
MAX_BYTES = 256 * 1024 * 1024
#: The most chunks an image may have (repetitions of sparse groups multiply them).
MAX_CHUNKS = 1_000_000
#: Largest image: the NBD size field is 64 bits, and nbdkit stops at 2^63 - 1 as well.
MAX_SIZE = (1 << 63) - 1


class DataError(ValueError):
    """A `data=` string that cannot be read; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Run:
    """`count` bytes of `value`."""

    value: int
    count: int


Chunk = tuple[int, bytes | Run]


@dataclass
class Image:
    chunks: list[Chunk] = field(default_factory=list)
    size: int = 0
    #: Bytes spelled out (not runs), kept as chunks are laid: summing them again for every
    #: field of a long string would make parsing quadratic.
    _spelled: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._spelled = sum(len(d) for _, d in self.chunks if isinstance(d, bytes))

    def spelled(self) -> int:
        return self._spelled

    def dense(self) -> bool:
        """One piece that fills the whole image (a byte, a string, a file, a run)."""
        if len(self.chunks) != 1 or self.chunks[0][0] != 0:
            return False
        data = self.chunks[0][1]
        return (data.count if isinstance(data, Run) else len(data)) == self.size

    def placed(self, at: int) -> list[Chunk]:
        return [(at + off, d) for off, d in self.chunks]

    def lay(self, item: Image, at: int) -> None:
        """Lay `item` down at offset `at` (over whatever is there)."""
        overlap = min(item.size, self.size - at)
        if overlap > 0 and not item.dense():
            # As nbdkit: an expression is laid down whole, so where it has no bytes of its own
            # (`1 2 3 @1 ( @1 )`) it writes zeros over what was there.
            self.chunks.append((at, Run(0, overlap)))
        self.chunks += item.placed(at)
        self._spelled += item._spelled
        self.size = max(self.size, at + item.size)

    def materialize(self) -> bytes:
        if self.size > MAX_BYTES:
            raise DataError(f"a slice of {self.size} bytes is more than this plugin spells out")
        out = bytearray(self.size)
        for off, d in self.chunks:
            if isinstance(d, Run):
                out[off : off + d.count] = bytes([d.value]) * d.count
            else:
                out[off : off + len(d)] = d
        return bytes(out)


_WORD = re.compile(r"(le|be)(16|32|64):(.*)")
_NAME = re.compile(r"\\[A-Za-z0-9_-]+")
_ESCAPES = {"n": 10, "t": 9, "r": 13, "a": 7, "b": 8, "f": 12, "v": 11, "\\": 92, '"': 34,
            "'": 39, "?": 63}  # fmt: skip
_DELIMITERS = set(' \t\n\r()[]*"')


def number(text: str, what: str) -> int:
    """A number as C's strtoumax with base 0 reads it: 0x.. hex, 0.. octal, else decimal."""
    value = c_integer(text)
    if value is None:
        raise DataError(f"{what}: {text!r} is not a number (decimal, 0x hex or 0 octal)")
    return value


class _Parser:
    def __init__(self, text: str, base_dir: Path) -> None:
        self.text = text
        self.pos = 0
        self.base_dir = base_dir

    # Scanning -------------------------------------------------------------------------------

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek(self) -> str:
        self._skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _word(self) -> str:
        """Characters up to the next delimiter."""
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _DELIMITERS:
            self.pos += 1
        return self.text[start : self.pos]

    def _fail(self, message: str) -> DataError:
        return DataError(f"data at offset {self.pos} of the string: {message}")

    # Grammar --------------------------------------------------------------------------------

    def sequence(self, names: ChainMap[str, Image], nested: bool) -> Image:
        image = Image()
        offset = 0
        while True:
            c = self._peek()
            if c == "":
                if nested:
                    raise self._fail("a '(' is not closed")
                return image
            if c == ")":
                if not nested:
                    raise self._fail("')' without '('")
                self.pos += 1
                return image
            if c == "@":
                self.pos += 1
                offset = self._move(offset)
                image.size = max(image.size, offset)
                continue
            start = self.pos
            item: Image | None = self._item(names)
            while item is not None:  # postfix operators, in the order written
                c = self._peek()
                if c == "*":
                    self.pos += 1
                    self._skip_space()
                    item = _repeat(item, number(self._word(), "'*' count"))
                elif c == "[":
                    item = self._slice(item)
                elif self.text.startswith("->", self.pos):
                    self.pos += 2
                    self._skip_space()
                    name = self._word()
                    if _NAME.fullmatch(name) is None:
                        raise self._fail(f"'->' needs a name like \\name, not {name!r}")
                    names[name] = item
                    item = None  # naming lays nothing down
                else:
                    break
            if item is None:
                continue
            if item.size and offset + item.size > MAX_SIZE:
                raise self._fail(f"the image would be larger than {MAX_SIZE} bytes")
            image.lay(item, offset)
            offset += item.size
            if len(image.chunks) > MAX_CHUNKS or image.spelled() > MAX_BYTES:
                self.pos = start
                raise self._fail("the data spells out too much (more than 256 MiB or 1M pieces)")

    def _move(self, offset: int) -> int:
        word = self._word()
        if word.startswith("+"):
            return offset + number(word[1:], "@+")
        if word.startswith("-"):
            back = number(word[1:], "@-")
            if back > offset:
                raise self._fail(f"@-{back} goes before the start (the offset is {offset})")
            return offset - back
        if word.startswith("^"):
            align = number(word[1:], "@^")
            if align == 0:
                raise self._fail("@^0: the alignment must be at least 1")
            return -(-offset // align) * align
        return number(word, "@")

    def _item(self, names: ChainMap[str, Image]) -> Image:
        c = self.text[self.pos]
        if c == "(":
            self.pos += 1
            return self.sequence(names.new_child(), nested=True)
        if c == '"':
            return self._string()
        if c == "\\":
            name = self._word()
            if name not in names:
                raise self._fail(f"{name} is not defined (name it first: EXPR -> {name})")
            return names[name]
        if c == "<":
            if self.text.startswith("<(", self.pos):
                raise self._fail("<(SCRIPT) is not supported: run the script and use <FILE")
            self.pos += 1
            path = Path(self._word())
            try:
                data = (path if path.is_absolute() else self.base_dir / path).read_bytes()
            except OSError as exc:
                raise self._fail(f"<{path}: {exc.strerror}") from None
            return Image([(0, data)], len(data)) if data else Image()
        if c == "$":
            raise self._fail("$VARIABLES are not supported")
        word = self._word()
        if not word:
            raise self._fail(f"unexpected {c!r}")
        m = _WORD.fullmatch(word)
        if m is not None:
            bits = int(m.group(2))
            value = number(m.group(3), f"{m.group(1)}{bits}")
            if value >= 1 << bits:
                raise self._fail(f"{word}: the word does not fit in {bits} bits")
            data = value.to_bytes(bits // 8, "little" if m.group(1) == "le" else "big")
            return Image([(0, data)], len(data))
        value = number(word, "BYTE")
        if value > 255:
            raise self._fail(f"BYTE {word} is not in the range 0..255")
        return Image([(0, bytes([value]))], 1)

    def _string(self) -> Image:
        self.pos += 1
        out = bytearray()
        text = self.text
        while True:
            if self.pos >= len(text):
                raise self._fail("a string is not closed with '\"'")
            c = text[self.pos]
            self.pos += 1
            if c == '"':
                break
            if c != "\\":
                out += c.encode()
                continue
            if self.pos >= len(text):
                raise self._fail("a string ends in '\\'")
            e = text[self.pos]
            self.pos += 1
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
            elif e == "x":
                digits = re.match(r"[0-9a-fA-F]{1,2}", text[self.pos :])
                if digits is None:
                    raise self._fail("\\x needs hex digits")
                out.append(int(digits.group(), 16))
                self.pos += len(digits.group())
            elif e in "01234567":
                digits = re.match(r"[0-7]{1,3}", text[self.pos - 1 :])
                assert digits is not None
                value = int(digits.group(), 8)
                if value > 255:
                    raise self._fail(f"\\{digits.group()} is more than a byte")
                out.append(value)
                self.pos += len(digits.group()) - 1
            else:
                raise self._fail(f"unknown escape \\{e} in a string")
        return Image([(0, bytes(out))], len(out)) if out else Image()

    def _slice(self, item: Image) -> Image:
        self.pos += 1
        end = self.text.find("]", self.pos)
        if end < 0:
            raise self._fail("a '[' is not closed")
        inside, self.pos = self.text[self.pos : end], end + 1
        first, colon, last = inside.partition(":")
        if not colon:
            raise self._fail(f"a slice is [START:END], not [{inside}]")
        lo = number(first.strip(), "slice start") if first.strip() else 0
        hi = number(last.strip(), "slice end") if last.strip() else item.size
        if not lo <= hi <= item.size:
            raise self._fail(f"slice [{inside}] is outside the {item.size} bytes it slices")
        data = item.materialize()[lo:hi]
        return Image([(0, data)], len(data)) if data else Image()


def _repeat(item: Image, times: int) -> Image:
    """`item * times`: laid down `times` times, one after another."""
    if times == 0 or item.size == 0:
        return Image()
    if len(item.chunks) == 1 and item.chunks[0][0] == 0:
        data = item.chunks[0][1]
        single = data.count == item.size if isinstance(data, Run) else len(data) == item.size
        if single and isinstance(data, Run):
            return Image([(0, Run(data.value, data.count * times))], item.size * times)
        if single and isinstance(data, bytes) and len(set(data)) == 1:
            return Image([(0, Run(data[0], len(data) * times))], item.size * times)
    if item.size * times > MAX_SIZE:
        raise DataError(f"repeating {item.size} bytes {times} times is too large")
    if len(item.chunks) * times > MAX_CHUNKS or item.spelled() * times > MAX_BYTES:
        raise DataError(
            f"repeating {item.size} bytes {times} times spells out too much "
            "(more than 256 MiB or 1M pieces)"
        )
    chunks: list[Chunk] = []
    for i in range(times):
        chunks += item.placed(i * item.size)
    return Image(chunks, item.size * times)


def parse(text: str, base_dir: Path | None = None) -> Image:
    """The image `text` describes; DataError says what is wrong with it, and where."""
    return _Parser(text, base_dir or Path.cwd()).sequence(ChainMap(), nested=False)
