"""nozero: change how WRITE_ZEROES and fast zero are handled (nbdkit-nozero-filter).

For measuring what efficient zeroing is worth, and for testing client fallbacks.

Params:
`zeromode` =
    `none` (default): WRITE_ZEROES is not advertised; clients write zeros like any data.
    `emulate`: advertised, but done by writing zeros upstream, never with the upstream's zero.
    `notrim`: passed on, without the permission to punch holes (NO_HOLE is set on each).
    `plugin`: passed on unchanged (to try `fastzeromode` alone).
`fastzeromode` =
    `default`: with `emulate`, fast zero is advertised and every fast zero request fails at
        once with ENOTSUP; with `notrim` or `plugin`, it is the upstream's.
    `slow`: advertised, and every fast zero request fails at once with ENOTSUP.
    `ignore` (unsafe): advertised, and the FAST_ZERO flag is dropped: the request does the
        slow zeroing the spec says it must refuse.
    `none`: fast zero is not advertised.
`notrim` and `plugin` refuse to start over a writable upstream that cannot zero at all.
With `zeromode=none`, `fastzeromode` has no effect (no WRITE_ZEROES, no fast zero).

Example: `nbdfabric node nozero zeromode=emulate --upstream nbd+unix:///?socket=disk.sock`

Differences from nbdkit: the mode check happens once at start, where nbdkit refuses each
connection in its handshake. nbdkit 1.32 spells the pass-through mode `plugin`; so does this
filter (there is no upstream "plugin" here: it means the upstream).
"""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import Literal

from ..base import Backend, Capabilities, Filter, Support
from ..params import Params, param
from ..protocol.constants import CmdFlag
from ..registry import register

_FUA, _NO_HOLE, _FAST_ZERO = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.FAST_ZERO)
_CHUNK = 1024 * 1024
_ZEROES = memoryview(bytes(_CHUNK))


class NoZeroParams(Params):
    zeromode: Literal["none", "emulate", "notrim", "plugin"] = param(
        "none",
        "none: not advertised; emulate: done with writes; notrim: no hole punching; "
        "plugin: passed on",
    )
    fastzeromode: Literal["default", "slow", "ignore", "none"] = param(
        "default", "fast zero: default, slow (always ENOTSUP), ignore (unsafe), none"
    )


@register
class NoZero(Filter):
    """Disables, emulates with writes, or restricts WRITE_ZEROES and fast zero."""

    kind = "nozero"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = NoZeroParams
    params: NoZeroParams

    def __init__(self, params: NoZeroParams, next: Backend) -> None:
        super().__init__(params, next)
        self._writes = False  #: zero() writes zeros itself (the session cannot: fast zero)

    async def start(self) -> None:
        await self.next.start()
        up = self.next.capabilities()
        mode = self.params.zeromode
        if mode in ("notrim", "plugin") and up.writable and up.zero is Support.NONE:
            raise ValueError(f"nozero: zeromode '{mode}' requires upstream zero support")
        # The session emulates zero by writing, but refuses fast zero when it does: `ignore`
        # must turn fast zero requests into writes, so this filter writes them.
        emulated = mode == "emulate" or up.zero is Support.EMULATE
        self._writes = emulated and self.params.fastzeromode == "ignore"

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        mode, fast = self.params.zeromode, self.params.fastzeromode
        if mode == "none":
            return replace(up, zero=Support.NONE, fast_zero=False)
        zero = Support.EMULATE if mode == "emulate" else up.zero
        if self._writes:
            zero = Support.NATIVE
        # `default` leaves fast zero to the upstream, except over the zeros `emulate` writes.
        passed_on = mode != "emulate" and fast == "default"
        fast_zero = up.fast_zero if passed_on else fast != "none"
        return replace(up, zero=zero, fast_zero=fast_zero).normalized()

    async def zero(self, count: int, offset: int, flags: int) -> None:
        p = self.params
        if flags & _FAST_ZERO:
            if p.fastzeromode == "ignore":
                flags &= ~_FAST_ZERO
            elif p.zeromode == "emulate" or p.fastzeromode == "slow":
                raise OSError(errno.ENOTSUP, "nozero: fast zero is refused in this mode")
        if p.zeromode == "notrim":
            flags |= _NO_HOLE
        if not self._writes:
            await self.next.zero(count, offset, flags)
            return
        pos = 0
        while pos < count:
            n = min(_CHUNK, count - pos)
            await self.next.pwrite(_ZEROES[:n], offset + pos, flags & _FUA)
            pos += n
