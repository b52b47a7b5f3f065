"""noextents: make the export look fully allocated (nbdkit-noextents-filter).

The upstream's extents are never asked for: every block-status request is answered "all data"
(no holes, no zeros), so a client cannot find the sparse parts of the disk. As in nbdkit, the
`base:allocation` meta context is still offered (nbdinfo lists it) and answered that way: the
session does it when a backend says `extents=False`. Everything else passes through.

Params: none.

Example: `nbdfabric node noextents --upstream nbd+unix:///?socket=file-on-tmpfs.sock`
(tmpfs answers lseek(SEEK_HOLE) slowly: clients stop asking).
"""

from __future__ import annotations

from dataclasses import replace

from ..base import Capabilities, Filter
from ..registry import register


@register
class NoExtents(Filter):
    """Hides the upstream's extents: everything reads as allocated data."""

    kind = "noextents"

    def capabilities(self) -> Capabilities:
        return replace(self.next.capabilities(), extents=False)
