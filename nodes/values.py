"""Values as people write them in params and on the command line, and back: sizes `1G`,
durations `10ms`, rates `10%`, errnos `EIO`, C integers `0x1f`. Standard library only, so the
command-line tools that only show values (`nbdfabric ctl`) start without pydantic; the typed
params (nodes/params.py) are built on these.
"""

from __future__ import annotations

import decimal
import errno as _errno
import math
import re
import shlex
from typing import Any

# re.ASCII: `\d` would take any script's digits (`٣K`, the fullwidth ones) as a number.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE | re.ASCII)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h)?\s*$", re.IGNORECASE | re.ASCII)
_DURATION_UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

MAX_SIZE = 2**63 - 1


def parse_size(value: Any) -> int:
    """`4096`, `512K`, `1G`, `1.5M`, `2GiB`: binary multiples, as nbdkit reads them."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 1G, 512K or a byte count")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ValueError("expected a size like 1G, 512K or a byte count")
        number, shift = m.group(1), _SIZE_SHIFT[m.group(2).lower()]
        # Whole numbers stay exact (2^63-1 does not survive a float); only `1.5M` needs one.
        n = int(number) << shift if number.isdigit() else int(float(number) * (1 << shift))
    if not 0 <= n <= MAX_SIZE:
        raise ValueError(f"a size must be between 0 and {MAX_SIZE}")
    return n


_C_INTEGER = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def c_integer(text: str, signed: bool = False) -> int | None:
    """A whole number as C's strtol with base 0 reads it (nbdkit's params do): `0x1f`
    hexadecimal, `017` octal, else decimal; a sign only when `signed`. None if it is not one."""
    m = _C_INTEGER.fullmatch(text)
    if m is None or (m.group(1) and not signed):
        return None
    digits = m.group(2)
    base = 16 if digits[:2].lower() == "0x" else 8 if digits[0] == "0" else 10
    return (-1 if m.group(1) == "-" else 1) * int(digits, base)


def parse_duration(value: Any) -> float:
    """Seconds as a float from `2`, `1.5s`, `10ms`, `250us`, `1m`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 10ms, 2s or a number of seconds")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # YAML `delay-read: 1000...0` (400 digits): an int past a float
            seconds = math.inf
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ValueError("expected a duration like 10ms, 2s or a number of seconds")
        seconds = float(m.group(1)) * _DURATION_UNIT[(m.group(2) or "s").lower()]
    # YAML's .inf/.nan, or more digits than a float holds: a wait that never ends (or compares
    # false with everything) is no duration; asyncio.sleep(nan) raises deep in a request.
    if not math.isfinite(seconds):
        raise ValueError("expected a finite duration like 10ms, 2s or a number of seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


_WHOLE = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
_DECIMAL = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*", re.ASCII)


def whole_number(text: str) -> int:
    """A decimal whole number in ASCII digits. Python's int() also takes `1_0`, other
    scripts' digits (`٣`) and fullwidth ones: none is how anyone writes a count."""
    if not _WHOLE.fullmatch(text):
        raise ValueError(f"expected a whole number, not {shown_input(text)}")
    return int(text)


def _decimal(text: str) -> float:
    """As whole_number, for float(): which also takes `inf`, `nan` and `1_0`."""
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"expected a number, not {shown_input(text)}")
    return float(text)


def parse_fraction(value: Any) -> float:
    """`10%`, `0.1` or `1/10` as a probability in [0, 1] (nbdkit's error-rate spelling)."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            frac = _decimal(text[:-1]) / 100
        elif "/" in text:
            num, den = text.split("/", 1)
            frac = _decimal(num) / _decimal(den)
        else:
            frac = _decimal(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise ValueError("expected a rate like 10%, 0.1 or 1/10") from exc
    if not 0.0 <= frac <= 1.0:
        raise ValueError("a rate must be between 0% and 100%")
    return frac


def parse_errno(value: Any) -> int:
    """An errno by name (`EIO`, `enospc`) or number (`5`, or YAML `5`)."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)  # the command line's `error=5`, as the docstring always said
    if isinstance(value, int) and not isinstance(value, bool):
        # A number (YAML `error: 5`) must be an errno this system has: -1 or 2**70 would be
        # raised by a filter as OSError and reach the NBD error mapping as nonsense.
        if value not in _errno.errorcode:
            raise ValueError("expected an errno name such as EIO, ENOSPC, EPERM, EINVAL")
        return value
    name = str(value).strip().upper()
    code = getattr(_errno, name, None)
    if not isinstance(code, int) or not name.startswith("E"):
        raise ValueError("expected an errno name such as EIO, ENOSPC, EPERM, EINVAL")
    return code


def _errno_name(code: int) -> str:
    return _errno.errorcode.get(code, str(code))


_SIZE_UNITS = ("E", "P", "T", "G", "M", "K")
#: Units a duration is shown in, largest first: the first its value reaches.
_SHOWN_DURATION_UNITS = ("s", "ms", "us", "ns")


def value_text(kind: str, value: Any) -> str:
    """A param's value as the command line takes it back: `5s`, `1ms`, `64M`, `EIO`, `true`,
    '' (Python's 5.0, 0.001, 67108864, 5, True and an empty string said less, or other
    things). `kind` is its type as field_info names it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    if isinstance(value, str) and any(c.isspace() for c in value):
        return shlex.quote(value)  # one word: eval's `missing` is `'exit 2'`
    if kind == "errno" and isinstance(value, int):
        return _errno_name(value)
    if kind == "size" and isinstance(value, int) and value > 0:
        for i, unit in enumerate(_SIZE_UNITS):
            scale = 1 << (10 * (len(_SIZE_UNITS) - i))
            if value % scale == 0:
                return f"{value // scale}{unit}"
    if kind == "duration" and isinstance(value, int | float):
        return _duration_text(float(value))
    if isinstance(value, float):
        return _plain(value)
    return str(value)


def _duration_text(seconds: float, within: float = 0.0) -> str:
    """In the largest unit the value reaches, with the fewest digits that read back as it (to
    `within` seconds; 0.00025 / 1e-6 is 250.00000000000003); else in seconds."""
    if seconds == 0:
        return "0s"
    unit = next(u for u in _SHOWN_DURATION_UNITS if seconds >= _DURATION_UNIT[u] or u == "ns")
    value = seconds / _DURATION_UNIT[unit]
    for digits in range(1, 18):
        text = _plain(float(f"{value:.{digits}g}")) + unit
        if abs(parse_duration(text) - seconds) <= within:
            return text
    return _plain(seconds) + "s"


def _plain(number: float) -> str:
    """The shortest decimal that reads back as `number`, without an exponent (params take
    none): 1.0 is `1`, 1e-05 `0.00001`."""
    text = format(decimal.Decimal(repr(number)), "f")
    return text.removesuffix(".0")


def wire_value_text(kind: str, text: str) -> str:
    """value_text of a value as the control plane sends it (gRPC Param.value: sizes in bytes,
    durations in seconds to 9 decimals, so `300ns` comes as 0.0000003, not 300 * 1e-9)."""
    try:
        if kind in ("size", "errno") and text.isdigit():
            return value_text(kind, int(text))
        if kind == "duration" and text:
            return _duration_text(parse_duration(text), within=0.5e-9)
    except ValueError:
        pass
    return text


MAX_SHOWN = 80


def shown_input(value: Any) -> str:
    """A bad value as an error message shows it: repr'd (so odd unicode is visible, and text
    that is not UTF-8 prints), shortened to MAX_SHOWN characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[: MAX_SHOWN - 5]}...{text[-2:]}"
