"""The `nbdfabric` command: `node` and `kinds` here; `ctl`/`health` from the control plane;
fabric commands (`up`, `down`, `status`, ...) from the orchestrator, loaded only when used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from .argtypes import seconds, whole
from .values import value_text

# The kinds, their typed params (pydantic) and the server are imported by the commands that
# use them: `ctl` and `health` start without them.

#: Sub-commands the orchestrator provides (nodes never import it at module level).
FABRIC_COMMANDS = ("up", "down", "status", "validate", "graph", "set", "compose", "k8s", "logs",
                   "events", "schema", "stop", "start", "restart")  # fmt: skip


def _node_parser(full_help: bool = True) -> argparse.ArgumentParser:
    """The `node` parser; without `full_help`, help that would load every kind is left short
    (a node imports only its own kind's module: see registry.get)."""
    from . import registry

    p = argparse.ArgumentParser(
        prog="nbdfabric node",
        description="Serve one node kind over NBD (see `nbdfabric kinds`).",
        epilog="environment: NBDFABRIC_LOG=LEVEL (debug, info, warning: the default, error) "
        "sets what the node logs on stderr; NBDFABRIC_UNIX_SNDBUF=BYTES the send buffer its "
        "unix sockets ask for (default 4194304, capped by net.core.wmem_max; 0: the "
        "kernel's default).",
    )
    p.add_argument("kind", help="the node's kind (`nbdfabric kinds` lists them)")
    p.add_argument(
        "params",
        nargs="*",
        default=[],  # else parse_intermixed_args said "required: kind, KEY=VALUE" without a kind
        metavar="KEY=VALUE",
        help="the kind's params (`nbdfabric kinds KIND`); a bare word sets its magic "
        "param: memory 1G, file disk.img",
    )
    p.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="URI",
        help="NBD URI the node reads through (nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?"
        "socket=PATH, nbds:// and nbds+unix:// for TLS): one for a filter, one per member, "
        "in order, for a fan",
    )
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="serve NBD on HOST:PORT, [IPV6]:PORT, unix:PATH or fd:N (port 0 picks a free "
        "one); repeatable; default 127.0.0.1:10809",
    )
    p.add_argument(
        "-U",
        "--unix",
        action="append",
        default=[],
        metavar="SOCKET",
        help="as --listen unix:SOCKET (nbdkit's -U); `-U -`: a private socket in a new "
        "directory, removed at exit (for --run)",
    )
    p.add_argument(
        "-p", "--port", metavar="PORT", help="as --listen IP:PORT (nbdkit's -p; IP from -i, "
        "else 127.0.0.1: nbdkit's default is every address)",
    )  # fmt: skip
    p.add_argument(
        "-i", "--ipaddr", metavar="IP", help="as --listen IP:PORT (nbdkit's -i; PORT from -p, "
        "else 10809)",
    )  # fmt: skip
    p.add_argument(
        "-f", "--foreground", action="store_true", help="accepted for nbdkit command lines: a "
        "node always runs in the foreground",
    )  # fmt: skip
    p.add_argument("--control", metavar="ADDR", help="serve gRPC control + health here")
    p.add_argument("--no-reflection", action="store_true", help="turn gRPC reflection off")
    p.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics here")
    p.add_argument(
        "-e", "--export-name", "--exportname", default="", metavar="NAME", help="the export's name"
    )
    p.add_argument("--description", default="", metavar="TEXT", help="the export's description")
    p.add_argument("-r", "--read-only", action="store_true", help="refuse writes")
    p.add_argument(
        "--print-uri",
        action="store_true",
        help="print the node's NBD URI once it serves (the real port when 0 was asked)",
    )
    p.add_argument(
        "--ready-file",
        metavar="PATH",
        help='once it serves, write {"uri": ..., "control": ...} here as JSON',
    )
    p.add_argument(
        "--run",
        metavar="CMD",
        help="captive mode: serve, run CMD through the shell with $uri (and $control) set, "
        "then stop and exit with its status",
    )
    p.add_argument(
        "-s",
        "--single",
        action="store_true",
        help="serve the one client connected on stdin/stdout (a socket: libnbd's "
        "connect_command), then exit, as nbdkit -s",
    )
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when the parent process dies (Linux), as nbdkit's option",
    )
    p.add_argument(
        "-P",
        "--pidfile",
        metavar="PATH",
        help="once it serves, write its process id here (replaced if there; left at exit)",
    )
    p.add_argument(
        "-u",
        "--user",
        metavar="USER",
        help="started as root: run as USER (name or id) once the sockets are bound and the "
        "backend is open, with USER's groups (and group, unless -g)",
    )
    p.add_argument(
        "-g", "--group", metavar="GROUP", help="started as root: run as GROUP (name or id)"
    )
    p.add_argument("--name", default="", help="node name for logs and metrics")
    p.add_argument(
        "--ordering",
        choices=("parallel", "ordered", "serial"),
        default="parallel",
        help="parallel: replies in completion order; ordered: work in parallel, replies in "
        "request order; serial: one request at a time",
    )
    # -1 was taken: every client was then turned away, as if the limit were reached
    p.add_argument(
        "--max-connections",
        type=whole(0),
        default=0,
        metavar="N",
        help="turn away clients beyond N at once (default 0: no limit)",
    )
    p.add_argument("--no-sr", action="store_true", help="refuse structured replies (testing)")
    p.add_argument(
        "--eof-tolerant",
        action="store_true",
        help="a read running past the end returns the valid part, then an error for the tail",
    )
    p.add_argument(
        "--tls",
        choices=("off", "on", "require"),
        default="off",
        help="off (default), on: offered to clients, require: refuse clients without it",
    )
    p.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help="ca-cert.pem, server-cert.pem and server-key.pem, as nbdkit's",
    )
    p.add_argument("--tls-psk", metavar="FILE", help="not supported yet: use --tls-certificates")
    p.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="only clients with a certificate of the CA in --tls-certificates",
    )
    p.add_argument(
        "--upstream-tls-certificates",
        metavar="DIR",
        help="for nbds:// upstreams: ca-cert.pem (and client-cert.pem, client-key.pem)",
    )
    p.add_argument(
        "--upstream-timeout",
        type=seconds(),
        default=30.0,
        metavar="SECONDS",
        help="how long to wait at start for upstreams to accept connections (default 30)",
    )
    # The kernel refuses 0 or less (and more than 32767) with EINVAL at setsockopt, which ran
    # in the accept loop: the first client ended it, and the node never accepted again.
    p.add_argument("--keepalive-idle", type=_keepalive, metavar="SECONDS",
                   help="TCP keepalive: idle time before the first probe")  # fmt: skip
    p.add_argument("--keepalive-interval", type=_keepalive, metavar="SECONDS",
                   help="TCP keepalive: time between probes")  # fmt: skip
    p.add_argument("--keepalive-count", type=_keepalive_count, metavar="N",
                   help="TCP keepalive: unanswered probes before the client is gone")  # fmt: skip
    p.add_argument(
        "--handshake-limit",
        type=seconds(zero=True),
        default=10.0,
        metavar="SECONDS",
        help="disconnect a client that has not finished negotiating within this time, as "
        "qemu-nbd does (default 10; 0: no limit)",
    )
    p.add_argument(
        "--workers",
        type=whole(1),
        default=1,
        metavar="N",
        help="serve with N worker processes sharing the listening sockets and the data, for "
        "clients with several connections (kinds that can: "
        + (
            ", ".join(sorted(k for k, c in registry.kinds().items() if c.shareable))
            if full_help
            else "see --help"
        )
        + ")",
    )
    p.add_argument(
        "--poll-max-us",
        type=whole(0),
        default=0,
        metavar="N",
        help="before sleeping, poll the sockets for up to N µs, adapting as QEMU's poll-max-ns: "
        "lower latency for clients at low queue depth, at the cost of a busy core (0: off)",
    )
    return p


#: The kernel's bounds for TCP_KEEPIDLE / TCP_KEEPINTVL (MAX_TCP_KEEPIDLE) and TCP_KEEPCNT.
_keepalive = whole(1, 32767)
_keepalive_count = whole(1, 127)


#: NBD's limit on export names (and nbdkit's on -e): a client cannot ask for a longer one.
MAX_EXPORT_NAME = 4096


def cmd_node(argv: Sequence[str]) -> int:
    args = _node_parser(full_help=bool({"-h", "--help"} & set(argv))).parse_intermixed_args(argv)
    private: str | None = None  #: `-U -`: the directory of the node's private socket
    for path in args.unix:
        if path == "-":
            private = private or tempfile.mkdtemp(prefix="nbdfabric-")
            path = os.path.join(private, "nbd.sock")
        args.listen.append(f"unix:{path}")
    if args.port is not None or args.ipaddr is not None:
        ip = args.ipaddr or "127.0.0.1"
        host = f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip
        args.listen.append(f"{host}:{args.port if args.port is not None else 10809}")
    try:
        return _serve_node(args)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _serve_node(args: argparse.Namespace) -> int:
    from . import registry
    from .params import ParamError, parse_params
    from .run import NodeSpec, SpecError, UpstreamOptions, run_node
    from .server.addresses import AddressError, parse_address
    from .server.node import NodeOptions

    try:
        cls = registry.get(args.kind)
        params = parse_params(args.kind, cls.Params, list(args.params), cls.magic)
        listen = [parse_address(a) for a in args.listen]
    except (ParamError, AddressError, KeyError) as exc:
        for line in str(exc).splitlines():  # one per problem: each says whose it is
            print(f"nbdfabric node: {line}", file=sys.stderr)
        return 1
    if len(args.export_name.encode(errors="surrogateescape")) > MAX_EXPORT_NAME:
        print(f"nbdfabric node: --export-name is longer than NBD's {MAX_EXPORT_NAME} bytes",
              file=sys.stderr)  # fmt: skip
        return 1
    clash = [o for o, given in (("--listen", args.listen), ("--print-uri", args.print_uri),
                                ("--run", args.run), ("--workers", args.workers > 1))
             if given]  # fmt: skip
    if args.single and clash:
        print(f"nbdfabric node: -s serves the client on stdin/stdout: it cannot go with "
              f"{', '.join(clash)}", file=sys.stderr)  # fmt: skip
        return 1
    try:
        run_as = _run_as(args.user, args.group)
    except ValueError as exc:
        print(f"nbdfabric node: {exc}", file=sys.stderr)
        return 1
    if args.tls != "off" and not (args.tls_certificates or args.tls_psk):
        print("nbdfabric node: --tls=on/require needs --tls-certificates DIR", file=sys.stderr)
        return 1
    options = NodeOptions(
        export_name=args.export_name,
        description=args.description,
        read_only=args.read_only,
        ordering=args.ordering,
        max_connections=args.max_connections,
        structured_replies=not args.no_sr,
        eof_tolerant=args.eof_tolerant,
        tls=args.tls,
        tls_certificates=args.tls_certificates,
        tls_psk=args.tls_psk,
        tls_verify_peer=args.tls_verify_peer,
        keepalive_idle=args.keepalive_idle,
        keepalive_interval=args.keepalive_interval,
        keepalive_count=args.keepalive_count,
        poll_max_us=args.poll_max_us,
        handshake_limit=args.handshake_limit,
    )
    spec = NodeSpec(
        kind=args.kind,
        params=params,
        upstreams=args.upstream,
        listen=listen,
        options=options,
        upstream_options=UpstreamOptions(
            tls_certificates=args.upstream_tls_certificates,
            connect_timeout=args.upstream_timeout,
        ),
        control=args.control,
        reflection=not args.no_reflection,
        metrics=args.metrics,
        print_uri=args.print_uri,
        ready_file=args.ready_file,
        run=args.run,
        name=args.name,
        workers=args.workers,
        single=args.single,
        exit_with_parent=os.getppid() if args.exit_with_parent else 0,
        pidfile=args.pidfile,
        run_as=run_as,
    )
    try:
        return run_node(spec)
    except SpecError as exc:
        print(f"nbdfabric node: {exc}", file=sys.stderr)
        return 1


def _run_as(user: str | None, group: str | None) -> Any:
    """-u/-g as a RunAs (names looked up now: a typo stops the node before it binds anything),
    or None. -u alone takes the user's own group."""
    import grp
    import pwd

    from .run import RunAs

    if user is None and group is None:
        return None
    uid = gid = None
    name = None
    if user is not None:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            raise ValueError(f"-u {user}: no such user") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group is not None:
        try:
            gid = (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
        except (KeyError, OverflowError):
            raise ValueError(f"-g {group}: no such group") from None
    return RunAs(user=name, uid=uid, gid=gid)


def cmd_kinds(argv: Sequence[str]) -> int:
    from . import registry
    from .params import field_info

    p = argparse.ArgumentParser(prog="nbdfabric kinds", description="List node kinds.")
    p.add_argument("kind", nargs="?")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.kind:
        try:
            cls = registry.get(args.kind)
        except KeyError as exc:
            print(f"nbdfabric kinds: {exc}", file=sys.stderr)
            return 1
        params = field_info(cls.Params)
        info: dict[str, Any] = {
            "kind": cls.kind,
            "role": cls.role,
            "summary": registry.summary(cls),
            "magic": cls.magic,
            "min_members": cls.min_members,
            "workers": cls.shareable,  #: can be served by several processes (--workers)
            "params": params,
            "manual": ((cls.__module__ and sys.modules[cls.__module__].__doc__) or "").strip(),
        }
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"{cls.kind} ({cls.role}): {info['summary']}")
        if cls.shareable:
            print("  (can be served by several processes: --workers N)")
        print()
        for prm in params:
            flags = []
            if prm["required"]:
                flags.append("required")
            elif prm["repeat"]:
                flags.append("may be repeated")
                if prm["follows"]:
                    flags.append(f"for each {prm['follows']} after it")
            elif prm["default"] is None:
                flags.append("optional")
            else:
                flags.append(f"default {value_text(prm['type'], prm['default'])}")
            if prm["live"]:
                flags.append("live")
            if prm["name"] == cls.magic:
                flags.append("magic")
            print(f"  {prm['name']}={prm['type']}  ({', '.join(flags)})")
            if prm["help"]:
                print(f"      {prm['help']}")
        print()
        print(info["manual"])
        return 0
    table = [
        {"kind": k, "role": c.role, "summary": registry.summary(c)}
        for k, c in registry.kinds().items()
    ]
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        width = max(len(r["kind"]) for r in table)
        for row in table:
            print(f"{row['kind']:<{width}}  {row['role']:<6}  {row['summary']}")
    return 0


USAGE = """usage: nbdfabric COMMAND ...

node KIND [KEY=VALUE ...]   serve one node (plugin, filter or fan) over NBD
chain [--filter=F]... PLUGIN [KEY=VALUE ...]
                            an nbdkit command line, each layer its own node process
kinds [KIND] [--json]       list node kinds, or one kind's params
ctl ADDR ...                talk to a node's gRPC control endpoint
health ADDR                 exit 0 only if the node at ADDR is SERVING
up FILE | down | status | validate FILE | graph | set NODE K=V | logs NODE
stop|start|restart NODE... | compose FILE | k8s FILE | schema | events
                            run and inspect fabrics from a topology file
--version                   print the version
"""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # The reader went away (`nbdfabric kinds | head`): stop quietly, as cat(1) does, with
        # the shell's status for a death by SIGPIPE. stdout is pointed at /dev/null first so
        # that flushing it at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _dispatch(args: list[str]) -> int:
    if not args:  # a usage error: on stderr, as argparse's
        print(USAGE, file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        from .control.server import version

        print(f"nbdfabric {version()}")
        return 0
    command, rest = args[0], args[1:]
    if command == "node":
        return cmd_node(rest)
    if command == "kinds":
        return cmd_kinds(rest)
    if command == "chain":
        from .chain import cmd_chain

        return cmd_chain(rest, _node_parser(full_help=False))
    if command in ("ctl", "health"):
        from .control import cli as control_cli  # type: ignore[attr-defined]

        return int(control_cli.main(command, rest))
    if command in FABRIC_COMMANDS:
        try:
            from orchestrator import cli as fabric_cli  # type: ignore[attr-defined]
        except ImportError:
            print(f"nbdfabric {command}: the orchestrator is not available", file=sys.stderr)
            return 1
        return int(fabric_cli.main(command, rest))
    print(f"nbdfabric: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
