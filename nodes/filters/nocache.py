"""nocache: change how NBD_CMD_CACHE is handled (nbdkit-nocache-filter).

For measuring what a client's cache (prefetch) requests are worth.

Param: `cachemode` =
    `none` (default): CACHE is not advertised; a client that sends it anyway gets EINVAL.
    `emulate`: CACHE is advertised and done by reading the range (the reads are thrown away),
        whatever the upstream can do.
    `nop`: CACHE is advertised and every request succeeds at once without doing anything.

Example: `nbdfabric node nocache cachemode=nop --upstream nbd+unix:///?socket=disk.sock`
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from ..base import Capabilities, Filter, Support
from ..params import Params, param
from ..registry import register

_SUPPORT = {"none": Support.NONE, "emulate": Support.EMULATE, "nop": Support.NATIVE}


class NoCacheParams(Params):
    cachemode: Literal["none", "emulate", "nop"] = param(
        "none", "none: CACHE not advertised; emulate: done with reads; nop: ignored"
    )


@register
class NoCache(Filter):
    """Disables, emulates with reads, or ignores cache requests."""

    kind = "nocache"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = NoCacheParams
    params: NoCacheParams

    def capabilities(self) -> Capabilities:
        return replace(self.next.capabilities(), cache=_SUPPORT[self.params.cachemode])

    async def cache(self, count: int, offset: int, flags: int) -> None:
        # Called only for `nop` (NATIVE); for `emulate` the session reads instead.
        pass
