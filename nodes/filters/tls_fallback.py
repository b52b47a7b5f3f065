"""tls-fallback: serve the upstream only to TLS clients; plaintext ones read a notice
(nbdkit-tls-fallback-filter).

For a node run with `--tls=on` (TLS allowed, not required), so that a client that did not start
TLS gets a gentler answer than `--tls=require`'s refusal: whatever export name it asks for, it
is given one read-only export holding `tlsreadme` padded with NUL bytes to a multiple of 512
bytes. Such a client never reaches the upstream: its connection opens nothing past this node, so
plaintext clients cannot spend what the upstream has for authenticated ones. Clients that
started TLS are served the upstream as it is. With `--tls=off` every client is plaintext and
reads the notice.

Params: `tlsreadme` (default "This NBD server requires TLS authentication before it will serve
useful data." and a newline).

Where we differ from nbdkit 1.32: a message longer than 512 bytes is served whole (the export
grows by 512-byte blocks); nbdkit cuts it at byte 512.

Example: `nbdfabric node tls-fallback --tls=on --tls-certificates pki/ --upstream
nbd+unix:///?socket=disk.sock`; then `nbdinfo nbd+unix:///?socket=...` shows a 512-byte
read-only disk and `nbdsh -u ... -c 'print(h.pread(512, 0))'` the message, while
`nbdinfo 'nbds+unix:///?socket=...&tls-certificates=pki/'` shows the disk itself.
"""

from __future__ import annotations

from ..base import Backend, Capabilities, Filter, Holes, Plugin, current_client
from ..params import Params, param
from ..registry import register

DEFAULT_README = "This NBD server requires TLS authentication before it will serve useful data.\n"
_SECTOR = 512


class TlsFallbackParams(Params):
    tlsreadme: str | None = param(
        None,
        "what plaintext clients read, padded with NULs to a multiple of 512 bytes "
        "(default: 'This NBD server requires TLS authentication ...', as nbdkit's)",
    )


class Notice(Plugin):
    """The read-only export a plaintext client is served: the message, then NULs."""

    kind = "tls-fallback-notice"  # never registered: a plaintext client's stand-in

    def __init__(self, message: str) -> None:
        super().__init__(Params())
        text = message.encode()
        size = max(_SECTOR, -(-len(text) // _SECTOR) * _SECTOR)
        self.content = text.ljust(size, b"\0")

    def capabilities(self) -> Capabilities:
        # As nbdkit's: read-only, nothing to flush, cache or share between connections.
        return Capabilities(size=len(self.content), writable=False, extents=True)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        buf[:] = self.content[offset : offset + len(buf)]
        return []


@register
class TlsFallback(Filter):
    """Serves plaintext clients a read-only notice instead of the upstream."""

    kind = "tls-fallback"
    passes_contexts = True  #: meta contexts pass through (see Filter), to TLS clients
    Params = TlsFallbackParams
    params: TlsFallbackParams

    def __init__(self, params: TlsFallbackParams, next: Backend) -> None:
        super().__init__(params, next)
        self.notice = Notice(DEFAULT_README if params.tlsreadme is None else params.tlsreadme)

    def for_client(self) -> Backend:
        return self if current_client.get().tls else self.notice
