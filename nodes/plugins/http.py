"""http: a disk image on an HTTP(S) server, read with range requests (nbdkit-curl-plugin).

The size comes from the server's answer to a one-byte range request (its Content-Range), which
also shows that the server serves byte ranges: one that does not is refused at start, with a
message saying so (reading the whole image for every request would be no disk at all). Each NBD
read is one `GET` with `Range: bytes=A-B`, over a pool of kept-alive connections
(`connections`); the answer must be a 206 for exactly that range, else the read fails with EIO.
The export is read-only (an HTTP server does not take writes; nbdkit's plugin needs `-r` for
the same reason) and advertises multi-conn, since nothing a client does can change what another
one reads.

A failed request (connection refused, reset, timeout, an HTTP error status) fails that NBD read
with EIO and is counted; the node keeps serving and the next read tries again, so a retry
filter in front hides short outages of the server. `nbdfabric ctl ADDR info` shows the counts
and the last error, and health is NOT_SERVING until a read succeeds again.

Params (nbdkit's names): `url` (magic, required; http:// or https://), `user` and `password`
(basic auth; `password=+FILE`, `-FD` or `-` read it as nbdkit does, nodes/passwords.py; never
shown by `ctl info`, nor is a password in the URL), `header` (an extra request header, `Name:
value`; repeat it for more),
`timeout` (per request; 0: none, though a server that does not connect within 30 s or sends
nothing for 60 s fails the read all the same), `sslverify` (default true), `cainfo` (a CA
bundle to verify the server with), `followlocation` (follow redirects, default true),
`connections` (kept-alive connections, default 4).

Example (a KubeVirt CDI-style import, compose/k8s-import.yaml):
`nbdfabric node http https://images.example/disk.img --listen unix:/tmp/img.sock`, then
`qemu-img convert -O qcow2 'nbd+unix:///?socket=/tmp/img.sock' disk.qcow2`.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import re
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import field_validator

from ..base import Capabilities, Holes, Plugin
from ..params import Duration, Many, Params, param, repeated, secret
from ..passwords import check_form, read_secret
from ..registry import register

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("nbdfabric.http")

#: glibc mallopt(3): keep this much freed memory in the heap, and serve allocations up to this
#: size from it. aiohttp hands each answer's body over in new bytes objects of a few hundred
#: KiB; by default glibc maps and unmaps or trims them every time, and the kernel zeroes the
#: pages again for each one: half of this node's CPU time at 1 MiB reads (bench/RESULTS.md).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED = 128 * 1024 * 1024
HEAP_UP_TO = 32 * 1024 * 1024
#: Seconds to connect, and without a byte from the server mid-answer, before a read fails.
CONNECT_TIMEOUT = 30.0
STALL_TIMEOUT = 60.0

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class HttpParams(Params):
    url: str = param(description="http:// or https:// URL of the disk image")
    user: str | None = param(None, description="user name for basic authentication")
    password: str | None = secret(
        description="password for basic authentication: SECRET, +FILE (its first line), -FD "
        "(read from that inherited file descriptor) or - (asked for on the terminal)"
    )

    @field_validator("password")
    @classmethod
    def _password_form(cls, value: str | None) -> str | None:
        return None if value is None else check_form(value)

    header: Many = repeated("an extra request header, 'Name: value'")
    timeout: Duration = param(0.0, description="time limit per request (0: none)")
    sslverify: bool = param(True, description="verify the server's certificate")
    cainfo: str | None = param(
        None, description="CA bundle (PEM file) to verify the server", path=True
    )
    followlocation: bool = param(True, description="follow redirects")
    connections: int = param(4, ge=1, le=64, description="kept-alive connections to the server")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("give an http:// or https:// URL with a host")
        return value

    def shown(self) -> dict[str, Any]:
        values = super().shown()
        values["url"] = redacted(self.url)  # a password in the URL stays out of sight too
        return values

    @field_validator("header")
    @classmethod
    def _headers(cls, values: list[str]) -> list[str]:
        for value in values:
            if ":" not in value or "\n" in value or "\r" in value:
                raise ValueError(f"give each header as 'Name: value', not {value!r}")
        return values


def redacted(url: str) -> str:
    """The URL without a password in it (for status and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@register
class Http(Plugin):
    """Reads an image from an HTTP(S) server with range requests."""

    kind = "http"
    shareable = True  #: --workers: each worker opens its own connections (start runs in it)
    Params = HttpParams
    magic = "url"
    params: HttpParams

    def __init__(self, params: HttpParams) -> None:
        super().__init__(params)
        self.size = 0
        self.requests = 0
        self.errors = 0
        self.last_error = ""
        self.failing = False  #: the last request failed (health)
        self._session: aiohttp.ClientSession | None = None
        self._headers: list[tuple[str, str]] = []
        self._password: bytes | None = None  #: read once (share(), else start())

    def _secret(self) -> bytes:
        if self._password is None:
            p = self.params
            self._password = (
                read_secret("password", p.password, "password: ") if p.password else b""
            )
        return self._password

    def share(self) -> None:
        """Before --workers fork: read the password here, once (a -FD read by one worker would
        be empty for the others, and `-` would ask each on the terminal)."""
        if self.params.user is not None:
            self._secret()

    # Lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        import aiohttp  # here, not at import: every node process imports every kind

        _reuse_freed_memory()
        p = self.params
        verify: ssl.SSLContext | bool = False  # sslverify=false
        if p.sslverify:
            verify = ssl.create_default_context(cafile=p.cainfo)
        connector = aiohttp.TCPConnector(limit=p.connections, ssl=verify)
        auth = None
        if p.user is not None:
            # The bytes as given (nbdkit hands libcurl the raw password), whatever they are.
            secret = self._secret()
            auth = aiohttp.BasicAuth(p.user, secret.decode("latin-1"), encoding="latin-1")
        for header in p.header:
            name, _, value = header.partition(":")
            self._headers.append((name.strip(), value.strip()))
        # Whatever `timeout` says, a server that stops answering fails the read, not hangs it.
        timeout = aiohttp.ClientTimeout(
            total=p.timeout or None, sock_connect=CONNECT_TIMEOUT, sock_read=STALL_TIMEOUT
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auth=auth, timeout=timeout, headers=self._headers
        )
        try:
            self.size = await self._probe()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _probe(self) -> int:
        """The image's size, checking that the server serves byte ranges."""
        import aiohttp

        session = self._checked_session()
        url, follow = self.params.url, self.params.followlocation
        try:
            # One byte by range: the size is in the answer's Content-Range, and it shows that
            # the server really serves ranges (HEAD's Accept-Ranges is only a promise).
            async with session.get(
                url, headers={"Range": "bytes=0-0"}, allow_redirects=follow
            ) as r:
                status, reason = r.status, r.reason
                length = r.headers.get("Content-Length")
                total = _content_range(r.headers.get("Content-Range", ""))[2]
        except aiohttp.ClientError as exc:
            raise OSError(errno.EHOSTUNREACH, f"{redacted(url)}: {exc}") from None
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"{redacted(url)}: timed out") from None
        if status == 206 and total is not None:
            return total
        if status == 416:  # not even byte 0: an empty image ("bytes */0")
            return total or 0
        if status == 200 and length == "0":
            return 0
        if status == 200:
            raise OSError(
                errno.EOPNOTSUPP,
                f"{redacted(url)}: the server does not serve byte ranges (it answered a range "
                "request with the whole file), so it cannot be read as a disk",
            )
        raise OSError(errno.EIO, f"{redacted(url)}: the server answered {status} {reason}")

    def _checked_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise OSError(errno.EIO, "the http plugin is not started")
        return self._session

    # Facts ----------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return Capabilities(size=self.size, writable=False, multi_conn=True)

    def healthy(self) -> bool:
        return self._session is not None and not self.failing

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": redacted(self.params.url),
            "size": self.size,
            "requests": self.requests,
            "errors": self.errors,
        }
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    # Reads ----------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        # In a Task of its own: aiohttp's timeouts need one, and the session serves requests
        # without (nodes/server/eager.py).
        await asyncio.get_running_loop().create_task(self._read(buf, offset))
        return []

    async def _read(self, buf: memoryview, offset: int) -> None:
        import aiohttp

        session = self._checked_session()
        count = len(buf)
        last = offset + count - 1
        self.requests += 1
        try:
            async with session.get(
                self.params.url,
                headers={"Range": f"bytes={offset}-{last}"},
                allow_redirects=self.params.followlocation,
            ) as r:
                if r.status != 206:
                    raise OSError(errno.EIO, f"{r.status} {r.reason} for bytes {offset}-{last}")
                first, end, _ = _content_range(r.headers.get("Content-Range", ""))
                if (first, end) != (offset, last):
                    raise OSError(
                        errno.EIO,
                        f"asked for bytes {offset}-{last}, the server sent {first}-{end}",
                    )
                got = 0
                async for chunk in r.content.iter_any():
                    n = len(chunk)
                    if got + n > count:
                        raise OSError(errno.EIO, "the server sent more than the range")
                    buf[got : got + n] = chunk
                    got += n
                if got != count:
                    raise OSError(errno.EIO, f"the server sent {got} of {count} bytes")
        except (aiohttp.ClientError, TimeoutError) as exc:  # both are OSErrors too: first
            why = str(exc) or type(exc).__name__
            self._failed(why)
            raise OSError(errno.EIO, f"{redacted(self.params.url)}: {why}") from None
        except OSError as exc:  # a wrong answer, found above
            self._failed(exc.strerror or str(exc))
            raise OSError(errno.EIO, f"{redacted(self.params.url)}: {exc.strerror}") from None
        self.failing = False

    def _failed(self, why: str) -> None:
        self.errors += 1
        self.failing = True
        if why != self.last_error:
            log.warning("%s: %s", redacted(self.params.url), why)
        self.last_error = why


def _reuse_freed_memory() -> None:
    """Tell glibc to keep and reuse the memory of big freed objects (see KEEP_FREED). This
    process serves only this node. Elsewhere (not glibc) nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_TRIM_THRESHOLD, KEEP_FREED)
    mallopt(_M_MMAP_THRESHOLD, HEAP_UP_TO)


def _content_range(text: str) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) from a Content-Range header; None where it says nothing."""
    m = _CONTENT_RANGE.fullmatch(text.strip())
    if m is None:
        return None, None, None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total
