"""blocksize-policy: set the block size constraints clients are told, and what happens to
requests that break them (nbdkit-blocksize-policy-filter).

The minimum, preferred and maximum block sizes advertised (NBD_INFO_BLOCK_SIZE) are the
upstream's, with those given here put in their place. When the upstream advertises none and
only some are given, the others default to minimum 1, preferred 4K and maximum 4G-1 (or
`blocksize-write-disconnect` rounded down to the minimum, when that is given). Then:
- `blocksize-error-policy=allow` (default): requests that break them reach the upstream all the
  same (the server's own checks are lifted), which may take them or fail them; put a blocksize
  node under this one to have them split and aligned.
- `blocksize-error-policy=error`: a request shorter than the minimum, not aligned to it, or (a
  read or write) longer than the maximum fails with EINVAL, and the upstream never sees it.
- `blocksize-write-disconnect=N`: a client that sends a write longer than N is disconnected at
  once, before its payload is read (as qemu-nbd treats writes over 32M).

Params: `blocksize-minimum` (a power of two up to 64K), `blocksize-preferred` (a power of two,
512 to 32M), `blocksize-maximum` (up to 4G-1, a multiple of the minimum, or 4G-1 itself),
`blocksize-write-disconnect` (larger than the minimum), all sizes, 0 (default) for not given;
minimum <= preferred <= maximum; `blocksize-error-policy` (allow | error).

Example: `nbdfabric node blocksize-policy blocksize-minimum=4K blocksize-preferred=64K
blocksize-error-policy=error --upstream URI` in front of a disk that only works in 4K blocks.

Differences from nbdkit: nbdkit 1.32 has no blocksize-write-disconnect (1.34 added it); nbdkit
checks the write's length only after reading its payload, we refuse it from the request
header. nbdkit's check that the maximum is a multiple of the minimum compares the maximum with
itself and lets anything through (its server then advertises no constraints at all, silently);
here such a maximum is refused when the node starts. A read or write over 64M fails with
EINVAL whatever the params say (nbdkit's server and libnbd have the same limit), so a maximum
above 64M (nbdkit's 4G-1 default, too) is advertised as 64M: nbdkit advertises 4G-1 and then
refuses what it advertised.
"""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import Literal

from pydantic import model_validator

from ..base import Capabilities, Filter
from ..params import Params, Size, param
from ..registry import register

#: The largest block size NBD can carry (a u32), which also says "no maximum".
U32_MAX = 0xFFFFFFFF
#: What is advertised for a constraint not given, over an upstream that advertises none.
DEFAULT_MINIMUM, DEFAULT_PREFERRED = 1, 4096


def _power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


class BlocksizePolicyParams(Params):
    blocksize_error_policy: Literal["allow", "error"] = param(
        "allow", "allow: pass requests that break the constraints on; error: EINVAL"
    )
    blocksize_minimum: Size = param(0, "minimum block size advertised (power of two <= 64K)")
    blocksize_preferred: Size = param(0, "preferred block size (power of two, 512 to 32M)")
    blocksize_maximum: Size = param(0, "maximum block size (<= 4G-1)")
    blocksize_write_disconnect: Size = param(0, "disconnect a client writing more than this")

    @model_validator(mode="after")
    def _check(self) -> BlocksizePolicyParams:
        lo, pref, hi = self.blocksize_minimum, self.blocksize_preferred, self.blocksize_maximum
        cut = self.blocksize_write_disconnect
        if max(lo, pref, hi, cut) > U32_MAX:
            raise ValueError("block sizes must be at most 4G-1 (4294967295)")
        if lo and (not _power_of_two(lo) or lo > 65536):
            raise ValueError("blocksize-minimum must be a power of two up to 64K")
        if pref and (not _power_of_two(pref) or not 512 <= pref <= 32 * 1024 * 1024):
            raise ValueError("blocksize-preferred must be a power of two from 512 to 32M")
        if lo and hi and hi != U32_MAX and hi % lo:
            raise ValueError("blocksize-maximum must be 4G-1 or a multiple of blocksize-minimum")
        if lo and pref and lo > pref:
            raise ValueError("blocksize-minimum must be <= blocksize-preferred")
        if pref and hi and pref > hi:
            raise ValueError("blocksize-preferred must be <= blocksize-maximum")
        if lo and cut and cut <= lo:
            raise ValueError("blocksize-write-disconnect must be larger than blocksize-minimum")
        return self


@register
class BlocksizePolicy(Filter):
    """Advertises block size constraints and enforces them, or lets them be broken."""

    kind = "blocksize-policy"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = BlocksizePolicyParams
    params: BlocksizePolicyParams

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        lo, pref, hi = self.block_sizes(up)
        p = self.params
        return replace(
            up,
            block_min=lo,
            block_preferred=pref,
            block_max=hi,
            enforce_block_size=p.blocksize_error_policy == "error",
            write_disconnect=p.blocksize_write_disconnect,
        )

    def block_sizes(self, up: Capabilities) -> tuple[int, int, int]:
        """(minimum, preferred, maximum): the upstream's with ours in their place."""
        p = self.params
        lo, pref, hi = p.blocksize_minimum, p.blocksize_preferred, p.blocksize_maximum
        if not (lo or pref or hi):
            return up.block_min, up.block_preferred, up.block_max
        if lo and pref and hi:
            return lo, pref, hi
        if not up.block_min:  # the upstream says nothing: defaults for what we do not say
            lo = lo or DEFAULT_MINIMUM
            pref = pref or DEFAULT_PREFERRED
            cut = p.blocksize_write_disconnect
            hi = hi or (cut - cut % lo if cut else U32_MAX)
        else:
            lo, pref, hi = lo or up.block_min, pref or up.block_preferred, hi or up.block_max
        if not lo <= pref <= hi:
            raise OSError(
                errno.EINVAL,
                f"blocksize-policy: the block sizes come to minimum {lo}, preferred {pref}, "
                f"maximum {hi}: not in order (the upstream's are {up.block_min}, "
                f"{up.block_preferred}, {up.block_max})",
            )
        return lo, pref, hi
