"""argparse types for the options of `nbdfabric node` and `nbdfabric ctl`: whole numbers in a
range, and durations. Each raises ArgumentTypeError, so argparse prints the reason in its usage
message (for a ValueError it would print only `invalid _whole value`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .values import parse_duration, whole_number


def whole(low: int, high: int | None = None, name: str = "") -> Callable[[str], int]:
    """A whole number in [low, high] (ASCII digits: see params.whole_number); `name` heads
    the message when argparse's own name for the argument is not the one users see."""
    head = f"{name}: " if name else ""

    def check(text: str) -> int:
        try:
            value = whole_number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{head}expected a whole number, not {text!r}"
            ) from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{head}must be {bound}, not {value}")
        return value

    return check


def seconds(zero: bool = False) -> Callable[[str], float]:
    """A duration (`2`, `1.5`, `500ms`, `2s`), finite and above 0 (or 0 itself when `zero`):
    `nan` reached int() inside libnbd's wait and crashed the node, and a timeout of 0 or less
    gives up before the first attempt."""

    def check(text: str) -> float:
        try:
            value = parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}, not {text!r}") from None
        if value <= 0 and not (zero and value == 0):
            raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text!r}")
        return value

    return check
