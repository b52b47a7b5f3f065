"""Listen addresses: parsing `HOST:PORT`, `[::1]:PORT`, `unix:PATH`, `fd:N`; opening sockets
(including systemd socket activation); and the NBD URI a client should use for each.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from urllib.parse import quote

DEFAULT_PORT = 10809
SD_LISTEN_FDS_START = 3
#: sun_path holds 108 bytes with the terminating NUL: longer paths cannot be bound.
UNIX_PATH_MAX = 107


class AddressError(ValueError):
    pass


@dataclass(frozen=True)
class Address:
    kind: str  #: tcp | unix | fd
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd:{self.fd}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """`127.0.0.1:10809`, `localhost:0`, `[::1]:0`, `:10809` (all interfaces), `unix:/p`, `fd:3`."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise AddressError(f"{text!r}: a unix address needs a path (unix:/run/x.sock)")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise AddressError(
                f"{text!r}: the path is {len(os.fsencode(path))} bytes long; a unix socket "
                f"path may have at most {UNIX_PATH_MAX}"
            )
        return Address("unix", path=path)
    if text.startswith("fd:"):
        try:
            return Address("fd", fd=int(text[3:]))
        except ValueError:
            raise AddressError(f"{text!r}: expected fd:N with a file descriptor number") from None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise AddressError(f"{text!r}: unclosed '[' in an IPv6 address")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise AddressError(f"{text!r}: expected [IPV6]:PORT")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif text.startswith(("tcp:", "tcp4:", "tcp6:")):
        raise AddressError(f"{text!r}: write TCP addresses as HOST:PORT, without a prefix")
    elif ":" in text:
        raise AddressError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise AddressError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"{text!r}: port {port} is out of range")
    return Address("tcp", host=host or "0.0.0.0", port=port)


def open_listener(addr: Address, backlog: int = 128) -> socket.socket:
    if addr.kind == "fd":
        try:
            sock = socket.socket(fileno=addr.fd)
        except (OSError, ValueError) as exc:  # not open, not a socket, negative
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise AddressError(f"cannot listen on {addr}: {why}") from None
    elif addr.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(addr.path).st_mode):
                os.unlink(addr.path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(addr.path)
        except OSError as exc:
            sock.close()
            raise AddressError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
    else:
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        try:
            infos = socket.getaddrinfo(addr.host, addr.port, family, socket.SOCK_STREAM)
        except socket.gaierror:
            try:
                infos = socket.getaddrinfo(addr.host, addr.port, 0, socket.SOCK_STREAM)
            except socket.gaierror as exc:  # the bare "Name or service not known" said not which
                raise AddressError(f"cannot listen on {addr}: {exc.strerror}") from None
        fam, _, _, _, sockaddr = infos[0]
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            raise AddressError(f"cannot listen on {addr}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def remove_socket_file(addr: Address) -> None:
    """Once a unix listener is closed: its file goes too (nothing if it is already gone)."""
    if addr.kind == "unix":
        with contextlib.suppress(OSError):
            os.unlink(addr.path)


def systemd_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def bound_address(sock: socket.socket) -> Address:
    """The real address of a listening socket (port 0 resolved)."""
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        return Address("unix", path=name if isinstance(name, str) else name.decode())
    host, port = sock.getsockname()[:2]
    return Address("tcp", host=host, port=port)


#: The schemes of the NBD URI standard that libnbd reads.
NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock", "nbd+ssh",
               "nbds+ssh")  # fmt: skip


def check_nbd_uri(uri: str) -> None:
    """Raise AddressError unless `uri` could be an NBD URI (its scheme, and a unix one's
    socket=). libnbd parses the rest when it connects; this catches what no retry can fix
    (`disk.img`, `http://...`) before a node or a fan waits its connect timeout on it."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() not in NBD_SCHEMES:
        raise AddressError(
            f"{uri!r} is not an NBD URI (nbd://HOST:PORT/EXPORT, "
            "nbd+unix:///EXPORT?socket=PATH, nbds:// or nbds+unix:// for TLS)"
        )
    if scheme.lower().endswith("+unix") and "socket=" not in rest:
        raise AddressError(f"{uri!r}: an nbd+unix URI needs ?socket=PATH")


def nbd_uri(addr: Address, export: str = "", tls: bool = False) -> str:
    scheme = "nbds" if tls else "nbd"
    name = quote(export, safe="")
    if addr.kind == "unix":
        return f"{scheme}+unix:///{name}?socket={quote(addr.path, safe='/')}"
    host = addr.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{addr.port}/{name}"


def set_keepalive(sock: socket.socket, idle: int | None, interval: int | None, count: int | None):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (
        (socket.TCP_KEEPIDLE, idle),
        (socket.TCP_KEEPINTVL, interval),
        (socket.TCP_KEEPCNT, count),
    ):
        if value is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
