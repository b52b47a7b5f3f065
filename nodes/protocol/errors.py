"""The one mapping from host errno values to NBD wire errors (and back), used by every node.

Nodes signal failure by raising `OSError(errno.X, message)`; the server turns it into the wire
error here. The rules follow nbdkit's `nbd_errno` and the spec's "when to use each".
"""

from __future__ import annotations

import errno

from .constants import Err

_TO_WIRE: dict[int, Err] = {
    errno.EPERM: Err.EPERM,
    errno.EROFS: Err.EPERM,
    errno.EACCES: Err.EPERM,
    errno.EIO: Err.EIO,
    errno.ENOMEM: Err.ENOMEM,
    errno.EINVAL: Err.EINVAL,
    errno.ENOSPC: Err.ENOSPC,
    errno.EDQUOT: Err.ENOSPC,
    errno.EFBIG: Err.ENOSPC,
    errno.EOVERFLOW: Err.EOVERFLOW,
    errno.ENOTSUP: Err.ENOTSUP,
    errno.ESHUTDOWN: Err.ESHUTDOWN,
    # A lost upstream or a dead disk is an I/O error to the client.
    errno.ECONNRESET: Err.EIO,
    errno.ECONNREFUSED: Err.EIO,
    errno.EPIPE: Err.EIO,
    errno.ENOTCONN: Err.EIO,
    errno.ETIMEDOUT: Err.EIO,
    errno.ENODATA: Err.EIO,
}

_FROM_WIRE: dict[int, int] = {
    Err.EPERM: errno.EPERM,
    Err.EIO: errno.EIO,
    Err.ENOMEM: errno.ENOMEM,
    Err.EINVAL: errno.EINVAL,
    Err.ENOSPC: errno.ENOSPC,
    Err.EOVERFLOW: errno.EOVERFLOW,
    Err.ENOTSUP: errno.ENOTSUP,
    Err.ESHUTDOWN: errno.ESHUTDOWN,
}


class ProtocolError(Exception):
    """The peer broke a rule we cannot recover from: the connection must be dropped."""


def to_wire(err: int, *, fast_zero: bool = False, df: bool = False) -> Err:
    """Map a host errno to the NBD error a client should see.

    ENOTSUP is only legal in answer to FAST_ZERO and EOVERFLOW only to DF; elsewhere they
    become EINVAL (as nbdkit does). An errno we do not know is EIO: the operation failed.
    """
    if err == errno.EOPNOTSUPP:
        err = errno.ENOTSUP
    wire = _TO_WIRE.get(err, Err.EIO)
    if wire is Err.ENOTSUP and not fast_zero:
        return Err.EINVAL
    if wire is Err.EOVERFLOW and not df:
        return Err.EINVAL
    return wire


def from_wire(err: int) -> int:
    """Map an NBD wire error to a host errno; unknown values count as EINVAL (spec)."""
    return _FROM_WIRE.get(err, errno.EINVAL)
