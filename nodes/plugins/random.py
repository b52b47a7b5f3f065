"""random: a disk of deterministic pseudo-random data that checks writes (nbdkit-random-plugin).

The content is a pure function of `seed` and offset, so two nodes with the same seed serve the
same disk and nothing is stored. A write succeeds only if it writes exactly what is already
there, otherwise it fails with EIO; trim and write-zeroes always fail with EIO (the disk is not
sparse). That makes the node both source and checker of a copy: `nbdcopy $uri $uri` passes
only if every byte lands where it was read from.

Our generator is not nbdkit's: the same seed gives different bytes than nbdkit, but the same
bytes from every nbdfabric node and every run. Not cryptographically secure.

Params: `size` (magic, required), `seed` (integer; default: chosen at random at start).

Example: `nbdfabric node random 1G seed=42 --run 'nbdcopy "$uri" "$uri"'` tests a copying
tool end to end.
"""

from __future__ import annotations

import errno
import random as _random
import secrets
from functools import lru_cache

from ..base import Capabilities, Holes, Plugin, Support
from ..params import Params, Size, param
from ..registry import register

#: Content is generated in chunks of this size, each seeded by (seed, chunk index).
CHUNK = 64 * 1024


class RandomParams(Params):
    size: Size = param(description="virtual size of the disk (e.g. 1G)")
    seed: int | None = param(None, description="seed for repeatable data (default: random)", ge=0)


@lru_cache(maxsize=64)
def random_chunk(seed: int, index: int) -> bytes:
    """Chunk `index` of the disk with this seed. Cached: a copy onto itself reads, then checks."""
    return _random.Random((seed << 64) | index).randbytes(CHUNK)


class RandomContent:
    """Random access into an endless deterministic byte stream."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def fill(self, buf: memoryview, offset: int) -> None:
        pos, end = 0, len(buf)
        while pos < end:
            index, skip = divmod(offset + pos, CHUNK)
            n = min(CHUNK - skip, end - pos)
            buf[pos : pos + n] = memoryview(random_chunk(self.seed, index))[skip : skip + n]
            pos += n

    def matches(self, buf: memoryview, offset: int) -> bool:
        pos, end = 0, len(buf)
        while pos < end:
            index, skip = divmod(offset + pos, CHUNK)
            n = min(CHUNK - skip, end - pos)
            want = memoryview(random_chunk(self.seed, index))[skip : skip + n]
            if bytearray(buf[pos : pos + n]) != want:  # one memmove and one memcmp: a
                return False  # memoryview compares item by item (100x slower)
            pos += n
        return True


@register
class Random(Plugin):
    """Deterministic random data; writes must match what is there."""

    kind = "random"
    Params = RandomParams
    magic = "size"
    params: RandomParams

    def __init__(self, params: RandomParams) -> None:
        super().__init__(params)
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        self.content = RandomContent(seed)

    def capabilities(self) -> Capabilities:
        # As nbdkit: trim and zero are offered (clients probe them) and then refused with EIO.
        return Capabilities(
            size=self.params.size,
            writable=True,
            trim=True,
            zero=Support.NATIVE,
            cache=Support.NATIVE,
            multi_conn=True,
        )

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        self.content.fill(buf, offset)
        return None

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if not self.content.matches(buf, offset):
            raise OSError(errno.EIO, "data written does not match the random disk")

    async def trim(self, count: int, offset: int, flags: int) -> None:
        raise OSError(errno.EIO, "cannot trim or zero a non-sparse random disk")

    async def zero(self, count: int, offset: int, flags: int) -> None:
        raise OSError(errno.EIO, "cannot trim or zero a non-sparse random disk")

    async def cache(self, count: int, offset: int, flags: int) -> None:
        pass
