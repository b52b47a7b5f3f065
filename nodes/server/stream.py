"""The byte stream under a session: a non-blocking socket used zero-copy, or TLS over it.

Reads land straight in the caller's buffer (`recv_into`); writes go out as one `sendmsg` of a
header and a payload view. The event loop is only involved when the kernel says "not now".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Sequence

from .pages import lazy_buffer

Buffer = bytes | bytearray | memoryview

#: Buffers per sendmsg: the kernel refuses more (EMSGSIZE). A 32 MiB read lent from 32 KiB
#: memory pages is 1024 views plus its header.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
#: SO_SNDBUF asked for on unix sockets (the kernel caps it at net.core.wmem_max and doubles it;
#: 4 MiB here). The default (208 KiB) takes a 256 KiB or 1 MiB reply in pieces, each sent after a
#: wake-up for room; with room for whole replies, `nbdcopy` through one `nbd` hop read 256 KiB
#: requests in 0.48 s a GiB instead of 0.76 (nbdkit: 0.50) and 1 MiB ones in 0.39 instead of
#: 0.62. A bound, not an allocation: only data the peer has not read yet takes memory. TCP is
#: left alone (setting it would turn off the kernel's own tuning of the buffer).
#: NBDFABRIC_UNIX_SNDBUF=BYTES asks for another size; 0 leaves the kernel's default.
UNIX_SNDBUF = int(os.environ.get("NBDFABRIC_UNIX_SNDBUF") or 4 * 1024 * 1024)
#: How long a failed TLS handshake may take to hand its alert to a client that does not read.
ALERT_TIMEOUT = 2.0


def widen_send_buffer(sock: socket.socket) -> None:
    """Room for whole big replies (or write requests) in a unix socket's send buffer."""
    if sock.family == socket.AF_UNIX and UNIX_SNDBUF:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)


def widen_send_buffer_of(fd: int) -> None:
    """The same for a socket someone else owns (a libnbd handle's): set through a duplicate."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        widen_send_buffer(sock)


class Stream:
    """Interface: `recv_into`, `send`, `close`; 0 from recv_into means the peer closed."""

    async def recv_into(self, view: memoryview) -> int:
        raise NotImplementedError

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Send all of `parts`."""
        raise NotImplementedError

    def try_send(self, parts: Sequence[Buffer]) -> int:
        """Send what the kernel takes right now, without waiting; returns the bytes sent."""
        return 0

    async def send_some(self, parts: Sequence[Buffer]) -> int:
        """Wait until some of `parts` can be sent; send what can be then; returns the bytes
        sent (all of them, here)."""
        await self.send(parts)
        return sum(map(len, parts))

    async def recv_exactly(self, view: memoryview) -> bool:
        """Fill `view`; False if the peer closed first."""
        got = 0
        while got < len(view):
            n = await self.recv_into(view[got:])
            if n == 0:
                return False
            got += n
        return True

    def close(self) -> None:
        raise NotImplementedError


class SocketStream(Stream):
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            widen_send_buffer(sock)
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def recv_into(self, view: memoryview) -> int:
        try:
            return self.sock.recv_into(view)
        except BlockingIOError:
            return await self.loop.sock_recv_into(self.sock, view)
        except (ConnectionResetError, BrokenPipeError):
            return 0

    def split_reader(self) -> socket.socket:
        """Hand the socket over to be read by an event-loop transport; this stream goes on
        sending on a duplicate (the loop will not watch a transport's own fd for writing)."""
        reader = self.sock
        self.sock = reader.dup()
        return reader

    def try_send(self, parts: Sequence[Buffer]) -> int:
        if len(parts) > IOV_MAX:
            return self._try_send_groups(parts)
        try:
            return self.sock.sendmsg(parts)
        except BlockingIOError:
            return 0

    def _try_send_groups(self, parts: Sequence[Buffer]) -> int:
        sent = 0
        for first in range(0, len(parts), IOV_MAX):
            group = parts[first : first + IOV_MAX]
            try:
                n = self.sock.sendmsg(group)
            except BlockingIOError:
                break
            sent += n
            if n < sum(map(len, group)):
                break
        return sent

    async def send(self, parts: Sequence[Buffer]) -> None:
        sent = self.try_send(parts)
        left = sum(map(len, parts)) - sent
        while left:
            # The socket buffer is full: wait until it drains, then send what is left of all
            # the parts at once (one wait per turn, not one per part; no copy).
            parts = remainder(parts, sent)
            sent = await self.send_some(parts)
            left -= sent

    async def send_some(self, parts: Sequence[Buffer]) -> int:
        await self._writable()
        return self.try_send(parts)

    async def _writable(self) -> None:
        fd = self.sock.fileno()
        ready = self.loop.create_future()
        self.loop.add_writer(fd, _wake, ready)
        try:
            await ready
        finally:
            self.loop.remove_writer(fd)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def remainder(parts: Sequence[Buffer], sent: int) -> list[Buffer]:
    """What is left of `parts` once their first `sent` bytes are gone."""
    out: list[Buffer] = []
    for part in parts:
        n = len(part)
        if sent >= n:
            sent -= n
            continue
        out.append(memoryview(part)[sent:] if sent else part)
        sent = 0
    return out


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class TLSStream(Stream):
    """TLS through an `ssl.SSLObject` and memory BIOs, on top of a SocketStream."""

    def __init__(self, raw: SocketStream, context: ssl.SSLContext, received: bytes = b"") -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # Bytes read from the socket before TLS began (behind STARTTLS): TLS records, or not.
        self.incoming.write(received)
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self._rbuf = lazy_buffer(65536)
        # The reader pumps out too (handshake and post-handshake records): without this lock
        # its bytes could land in the middle of a reply still being written by a sender.
        self._out_lock = asyncio.Lock()

    async def _pump_out(self) -> None:
        async with self._out_lock:
            data = self.outgoing.read()
            if data:
                await self.raw.send([data])

    async def _pump_in(self) -> bool:
        n = await self.raw.recv_into(memoryview(self._rbuf))
        if n == 0:
            self.incoming.write_eof()
            return False
        self.incoming.write(self._rbuf[:n])
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._pump_out()
                if not await self._pump_in():
                    raise ConnectionResetError("peer closed during the TLS handshake") from None
            except ssl.SSLError:
                # OpenSSL has written the alert that says why (certificate required, unknown
                # CA, protocol version, ...): send it, so the client reports that reason and
                # not a connection cut short.
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._send_alert(), ALERT_TIMEOUT)
                raise
        await self._pump_out()

    async def _send_alert(self) -> None:
        """Send what OpenSSL wrote, then read the client out until it closes: a TLS 1.3
        client already sends its first record when the server rejects its certificate, and
        closing on unread bytes would cut the connection (EPIPE, RST) before it reads why."""
        await self._pump_out()
        self.raw.sock.shutdown(socket.SHUT_WR)
        while await self.raw.recv_into(memoryview(self._rbuf)):
            pass

    def buffered(self) -> bool:
        """Bytes already read from the socket and not yet handed out (decrypted or not)."""
        return bool(self.obj.pending() or self.incoming.pending)

    @property
    def peer_certificate(self) -> dict | None:
        return self.obj.getpeercert()

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return int(self.obj.read(len(view), view))  # type: ignore[arg-type]
            except ssl.SSLWantReadError:
                await self._pump_out()
                if not await self._pump_in():
                    return 0
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0

    async def send(self, parts: Sequence[Buffer]) -> None:
        for part in parts:
            if len(part):
                self.obj.write(part)
        await self._pump_out()

    def close(self) -> None:
        try:
            self.obj.unwrap()
            self.raw.sock.send(self.outgoing.read())
        except (ssl.SSLError, OSError):
            pass
        self.raw.close()
