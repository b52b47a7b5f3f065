"""ip: allow or refuse clients by address, process, user or group (nbdkit-ip-filter).

When a client connects, before the handshake: if it matches a rule of `allow` it is let in;
else if it matches a rule of `deny` it is refused; else it is let in. A refused client's
connection is closed without a word (as nbdkit does); the node serves the others on.
With neither param the filter does nothing.

Rules, comma-separated, keywords in any case:
`all`/`any` (every client, unix sockets too), `allipv4`/`anyipv4`, `allipv6`/`anyipv6`,
`allunix`/`anyunix`, `A.B.C.D`, `A.B.C.D/NN`, `A:B:...`, `A:B:.../NN` (an IPv4 client of an
IPv6 socket is `::ffff:A.B.C.D`), and for unix-socket clients `pid:PID`, `uid:UID`, `gid:GID`
(the peer's credentials, SO_PEERCRED). nbdkit's `allvsock`/`anyvsock`/`vsock-cid:`/`vsock-port:`
are accepted and never match (nodes do not listen on vsock); `security:` is not supported.
Unix-socket clients match only `all`, `anyunix` and the `pid:`/`uid:`/`gid:` rules.

Params: `allow`, `deny` (both live: a change applies to the next connection).

Example: `nbdfabric node ip allow=127.0.0.1,::1 deny=all --listen [::]:10809 --upstream URI`
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator

from ..base import Backend, ClientInfo, Filter, current_client
from ..params import Params, live
from ..registry import register
from ..values import c_integer

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_KEYWORDS = {
    "all": "any",
    "any": "any",
    "allipv4": "ipv4",
    "anyipv4": "ipv4",
    "allipv6": "ipv6",
    "anyipv6": "ipv6",
    "allunix": "unix",
    "anyunix": "unix",
    "allvsock": "vsock",
    "anyvsock": "vsock",
}
#: Rules naming a unix-socket peer's credential: the index in ClientInfo.peer_credentials.
_CREDENTIALS = {"pid": 0, "uid": 1, "gid": 2}


@dataclass(frozen=True)
class Rule:
    kind: str  #: any, ipv4, ipv6, unix, vsock (families); net; pid, uid, gid; vsock-cid/-port
    network: IPNetwork | None = None
    id: int = 0

    def matches(self, family: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                credentials: tuple[int, int, int] | None) -> bool:  # fmt: skip
        if self.kind == "any":
            return True
        if self.kind == "net":
            assert self.network is not None
            return ip is not None and ip.version == self.network.version and ip in self.network
        if self.kind in _CREDENTIALS:
            return (
                family == "unix"
                and credentials is not None
                and credentials[_CREDENTIALS[self.kind]] == self.id
            )
        return self.kind == family  # ipv4, ipv6, unix, vsock; vsock-cid/-port never


def _integer(text: str, what: str) -> int:
    """A C integer as nbdkit reads it: decimal, 0x hexadecimal or 0 octal."""
    value = c_integer(text, signed=True)
    if value is None:
        raise ValueError(f"{what} could not parse number {text!r}")
    return value


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # inet_pton's forms only: no scope (%eth0), no leading zeros (ipaddress refuses those too).
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_rule(name: str, text: str) -> Rule:
    kind = _KEYWORDS.get(text.lower())
    if kind is not None:
        return Rule(kind)
    prefix, colon, rest = text.partition(":")
    key = prefix.lower()
    if colon and key in _CREDENTIALS:
        n = _integer(rest, f"{key}:")
        if n < 0 or (key == "pid" and n == 0):
            raise ValueError(f"{key}: parameter out of range in {name}={text}")
        return Rule(key, id=n)
    if colon and key in ("vsock-cid", "vsock-port"):
        n = _integer(rest, f"{key}:")
        if not 0 <= n <= 0xFFFFFFFF:
            raise ValueError(f"{key}: parameter out of range in {name}={text}")
        return Rule(key, id=n)
    if colon and key == "security":
        raise ValueError(f"{name}={text}: security: rules (SELinux labels) are not supported")
    addr_text, slash, length_text = text.partition("/")
    addr = _address(addr_text)
    if slash:
        if not length_text.isdigit():
            raise ValueError(f"{name}: cannot parse prefix length {length_text!r} in {text}")
        if addr is None:
            raise ValueError(f"cannot parse address {addr_text!r} from {name}={text}")
        if int(length_text) > addr.max_prefixlen:
            raise ValueError(f"prefix is > {addr.max_prefixlen} in {name}={text}")
        # Host bits may be set (10.1.2.3/8): like nbdkit, compare only the prefix.
        network = ipaddress.ip_network(f"{addr}/{int(length_text)}", strict=False)
        return Rule("net", network)
    if addr is not None:
        return Rule("net", ipaddress.ip_network(addr))
    raise ValueError(f"don't know how to parse rule: {name}={text}")


def parse_rules(name: str, text: str) -> list[Rule]:
    """nbdkit's list: entries separated by commas; one trailing comma is fine, "" is no rules."""
    items = text.split(",")
    if items and items[-1] == "":
        items.pop()
    if any(item == "" for item in items):
        raise ValueError(f"{name}: empty entry in rule list")
    return [parse_rule(name, item) for item in items]


def _valid(name: str) -> AfterValidator:
    def check(text: str) -> str:
        parse_rules(name, text)
        return text

    return AfterValidator(check)


class IpParams(Params):
    allow: Annotated[str, _valid("allow")] = live("", "rules that let a client in (checked first)")
    deny: Annotated[str, _valid("deny")] = live("", "rules that refuse a client (checked second)")


def peer(client: ClientInfo) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """The client's family (ipv4, ipv6, unix, other) and IP address, from its address text
    (`1.2.3.4:5`, `[::1]:5`, `unix`)."""
    address = client.address
    if address.startswith("unix"):
        return "unix", None
    if address.startswith("["):
        host = address[1 : address.find("]")]
    else:
        host = address.rpartition(":")[0] or address
    ip = _address(host.partition("%")[0])
    if ip is None:
        return "other", None
    return ("ipv6" if ip.version == 6 else "ipv4"), ip


def allowed(allow: list[Rule], deny: list[Rule], client: ClientInfo) -> bool:
    family, ip = peer(client)
    if family == "other":
        return True  # nbdkit: sockets that are neither IP, unix nor vsock are never filtered
    credentials = client.peer_credentials
    if any(rule.matches(family, ip, credentials) for rule in allow):
        return True
    return not any(rule.matches(family, ip, credentials) for rule in deny)


@register
class Ip(Filter):
    """Lets clients in or refuses them by address, process, user or group."""

    kind = "ip"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = IpParams
    params: IpParams

    def __init__(self, params: IpParams, next: Backend) -> None:
        super().__init__(params, next)
        self._load()

    def configure(self, changes: dict[str, Any]) -> None:
        super().configure(changes)
        self._load()

    def _load(self) -> None:
        self.allow = parse_rules("allow", self.params.allow)
        self.deny = parse_rules("deny", self.params.deny)

    async def preconnect(self) -> None:
        if not allowed(self.allow, self.deny, current_client.get()):
            raise OSError(
                errno.EACCES,
                "client not permitted to connect because of source address restriction",
            )
        await self.next.preconnect()
