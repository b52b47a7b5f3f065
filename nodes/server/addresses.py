"""Listen addresses: parsing `HOST:PORT`, `[::1]:PORT`, `unix:PATH`, `fd:N`; opening sockets
(including systemd socket activation); and the NBD URI a client should use for each.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote

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


class UriParts(NamedTuple):
    """`scheme://authority/path?query#fragment` cut where libnbd cuts it."""

    scheme: str
    authority: str  #: host and port, or nothing (nbd+unix)
    path: str  #: "/" and the export name, percent-encoded; or ""
    after: str  #: "?query#fragment" as given


def uri_parts(uri: str) -> UriParts:
    scheme, _, rest = uri.partition("://")
    start = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
                default=len(rest))  # fmt: skip
    tail = rest[start:]
    cut = min((i for i in (tail.find("?"), tail.find("#")) if i >= 0), default=len(tail))
    return UriParts(scheme, rest[:start], tail[:cut], tail[cut:])


def export_name(uri: str) -> str:
    """The export name an NBD URI names: its path without the first "/", percent-decoded."""
    return _decoded_export(uri_parts(uri).path)


def _decoded_export(path: str) -> str:
    return unquote(path[1:]) if path.startswith("/") else ""


def with_export(uri: str, name: str) -> str:
    """`uri` naming export `name` instead (same server, scheme, socket and query)."""
    scheme, authority, _, after = uri_parts(uri)
    return f"{scheme}://{authority}/{quote(name, safe='')}{after}"


def export_identity(uri: str, cwd: str | None = None) -> tuple[str | int, ...]:
    """Where the bytes of an NBD URI go, as libnbd reads it: two URIs with equal keys reach
    the same export of the same server (a fan must not have it twice).

    ("unix", socket path made absolute against `cwd` (default: ours), export name),
    ("tcp", host lowercased, port (10809 when none), export name), ("vsock", cid, port, export
    name); TLS or not (nbds) does not change where they go. The export name and the socket
    path are percent-decoded as libnbd does. Any other URI (nbd+ssh, one libnbd would refuse)
    is only itself: ("uri", uri).

    Conservative: equal keys are one export, but different keys may still be one, in ways the
    text cannot tell (a host name and its address, two names of a host, a symlink to a socket
    or a directory, a forwarded port, a server that serves one disk under two names)."""
    scheme, authority, path, after = uri_parts(uri)
    if "://" not in uri or not scheme.lower().startswith("nbd"):
        return ("uri", uri)
    transport = scheme.lower().removeprefix("nbds").removeprefix("nbd")
    query = after.split("#", 1)[0].removeprefix("?")
    export = _decoded_export(path)
    if transport == "+unix":
        socket_path = _query_value(query, "socket")
        if not socket_path:
            return ("uri", uri)
        return ("unix", _absolute(socket_path, os.getcwd() if cwd is None else cwd), export)
    host, port = _host_port(authority.rpartition("@")[2])
    if port is None:
        return ("uri", uri)
    if transport == "":
        return ("tcp", host or "localhost", port, export)
    if transport == "+vsock" and (host or "2").isdigit():
        return ("vsock", int(host or "2"), port, export)
    return ("uri", uri)


def _query_value(query: str, name: str) -> str | None:
    """The last value of `name` in a URI query, decoded, as libnbd finds it: a part ends at
    the first "&", or where there is none at the first ";"."""
    found = None
    while query:
        end = query.find("&")
        if end < 0:
            end = query.find(";")
        if end < 0:
            end = len(query)
        key, _, value = query[:end].partition("=")
        if key and unquote(key) == name:  # ("=value" is skipped, "name" alone is "")
            found = unquote(value)
        query = query[end + 1 :]
    return found


def _host_port(hostport: str) -> tuple[str, int | None]:
    """(host, port) of a URI's authority (without user): the host lowercased, an IPv6 address
    in its short form, the port 10809 when none (or 0) is given; None: not a port."""
    if hostport.startswith("["):
        host, _, after = hostport[1:].partition("]")
        port_text = after.removeprefix(":")
    else:
        host, _, port_text = hostport.partition(":")
    host = unquote(host).lower()
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit():
        return host, None
    return host, int(port_text) or DEFAULT_PORT


def _absolute(path: str, cwd: str) -> str:
    """`path` from `cwd` (a physical path, as os.getcwd() gives), without "." or empty parts.
    A ".." is taken away only where it climbs the physical part (cwd, or the root): after a
    part of the path itself, which may be a symlink, the kernel's answer may differ."""
    parts = [] if path.startswith("/") else [p for p in cwd.split("/") if p]
    climbing = True
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == ".." and climbing:
            if parts:
                parts.pop()
            continue
        climbing = False
        parts.append(part)
    return "/" + "/".join(parts)


def repeats(keys: Iterable[Hashable]) -> list[tuple[int, int]]:
    """(i, j) for each key J equal to an earlier one, I the first of them."""
    first: dict[Hashable, int] = {}
    return [(first[k], j) for j, k in enumerate(keys) if first.setdefault(k, j) != j]


def repeated_export(uris: Sequence[str], cwd: str | None = None) -> tuple[int, int] | None:
    """The first (i, j), i < j, of `uris` that are one export (export_identity), if any."""
    found = repeats(export_identity(uri, cwd) for uri in uris)
    return found[0] if found else None


def same_export_problem(
    i: int, first: str, j: int, second: str, show: Callable[[str], str] = str
) -> str:
    """What is wrong with a fan whose members I and J are one export (FIRST and SECOND)."""
    given = f"{show(first)} given twice" if first == second else f"{show(first)} and {show(second)}"
    return (f"members {i} and {j} are the same export ({given}): each member must be a "
            "different export, or the fan would use one as two")  # fmt: skip


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
