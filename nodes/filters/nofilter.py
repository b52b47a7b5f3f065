"""nofilter: pass every request through unchanged (nbdkit-nofilter-filter).

The Filter base class as a node of its own: what it serves is what its upstream serves (data,
extents, every meta context the upstream lists, capabilities, block sizes, errors). nbdkit has
it for testing its filter machinery; here it is the same as an `nbd` node without params, and
is there so that an nbdkit command line with `--filter=nofilter` runs under `nbdfabric chain`
as it is.

Params: none.

Example: `nbdfabric chain -U - --filter=nofilter memory 1G --run 'nbdinfo "$uri"'`
"""

from __future__ import annotations

from ..base import Filter
from ..registry import register


@register
class NoFilter(Filter):
    """Passes everything through to the upstream."""

    kind = "nofilter"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    shareable = True  #: --workers (see workers.py)
