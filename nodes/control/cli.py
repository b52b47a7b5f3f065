"""`nbdfabric ctl ADDR COMMAND` (talk to one node's gRPC control endpoint) and
`nbdfabric health ADDR` (exit 0 only when the node is SERVING: for compose and k8s probes).

Human output is rich tables; `--json` prints one JSON document (or one per line for streams).
Exit status: 0 done, 1 the node refused or failed, 2 usage, 3 the node could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..argtypes import seconds, whole
from ..values import parse_size, wire_value_text
from .rpc.nbdfabric.v1 import node_pb2 as pb
from .rpc.nbdfabric.v1 import node_pb2_grpc as pb_grpc

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
#: `ctl replace` waits for the new member to connect (up to the fan's --upstream-timeout, 30 s
#: by default) and checks it before answering: the default 10 s gave up on replaces that worked.
REPLACE_TIMEOUT = 60.0
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# Messages as plain data ----------------------------------------------------------------------


def to_data(msg: Message) -> dict[str, Any]:
    """A message as JSON-ready data: every field present, enums as short lowercase names
    (NODE_STATE_SERVING -> serving), 64-bit ints as numbers, `x_json` fields decoded as `x`."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        name = field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[name] = {k: _value(field.message_type.fields_by_name["value"], v)
                         for k, v in value.items()}  # fmt: skip
            continue
        if field.has_presence and field.message_type is None and not msg.HasField(name):
            out[name] = None
            continue
        if name.endswith("_json"):
            out[name.removesuffix("_json")] = json.loads(value) if value else None
            continue
        if _is_repeated(field):
            out[name] = [_value(field, v) for v in value]
        else:
            out[name] = _value(field, value)
    return out


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6 has a property
    if repeated is not None:
        return bool(repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        name = enum.values_by_number[value].name if value in enum.values_by_number else value
        prefix = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper()
        return str(name).removeprefix(prefix + "_").lower()
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            return value.ToJsonString()
        return to_data(value)
    return value


# Human output --------------------------------------------------------------------------------


def _console() -> Any:
    from rich.console import Console

    # Piped output keeps long URIs on one line (rich would fold them at 80 columns).
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    from rich.table import Table

    table = Table(
        title=title,
        title_justify="left",
        show_edge=False,
        pad_edge=False,
        show_header=any(columns),
    )
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    return table


def human_size(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T", "P"):
        if abs(n) < 1024 or unit == "P":
            return f"{n:.0f}{unit}" if unit == "B" or n == int(n) else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f}s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f}ms"
    return f"{s * 1e6:.0f}us"


def shown(param: pb.Param) -> str:
    """A param's value as the command line spells it (`1ms`, `64M`), not as gRPC carries it
    (seconds, bytes: `delay-read=1ms` was echoed as `0.001`)."""
    return wire_value_text(param.type, param.value)


def show_info(info: pb.GetInfoResponse) -> None:
    d = to_data(info)
    con = _console()
    caps = [k for k, v in d["capabilities"].items() if v and v != "none"]
    rows = [
        ("kind", f"{d['kind']} ({d['role']})"),
        ("state", d["state"] + ("" if d["healthy"] else "  (unhealthy)")),
        *(
            [("exports", "\n".join(
                e["name"] + (f"  {e['description']}" if e["description"] else "")
                for e in d["exports"]) or "(none now)")]
            if d["serves_several"] else
            [("export", repr(d["export_name"])
                        + (f"  {d['description']}" if d["description"] else "")),
             ("size", f"{human_size(d['size'])} ({d['size']} bytes)")]
        ),
        ("capabilities", ", ".join(
            k if v is True else f"{k}={v}" for k, v in d["capabilities"].items() if k in caps)),
        ("block sizes", "min {minimum} / preferred {preferred} / max {maximum}".format(
            **d["block_sizes"])),
        ("uris", "\n".join(d["uris"])),
        ("version", f"{d['version']}  pid {d['pid']}  {d['event_loop']}  "
                    f"up {_seconds(d['uptime_seconds'])}"),
    ]  # fmt: skip
    polling = d["polling"]
    if polling["max_ns"]:
        rows.append(("polling", "up to {} µs, now {} µs; {} hits, {} misses; {} sockets".format(
            polling["max_ns"] // 1000, polling["ns"] // 1000, polling["hits"],
            polling["misses"], polling.get("sockets", 0))))  # fmt: skip
    con.print(_table(None, ("", ""), rows))
    if d["params"]:
        con.print()
        con.print(
            _table(
                "params",
                ("name", "value", "type", "live"),
                [
                    (
                        p["name"],
                        wire_value_text(p["type"], p["value"]),
                        p["type"],
                        "live" if p["live"] else "",
                    )
                    for p in d["params"]
                ],
            )
        )
    if d["upstreams"]:
        con.print()
        con.print(
            _table(
                "upstreams",
                ("#", "uri", "state", "healthy"),
                [
                    (u["index"], u["uri"], u["state"], "yes" if u["healthy"] else "NO")
                    for u in d["upstreams"]
                ],
            )
        )
    status = d["status"] or {}
    if isinstance(status.get("workers"), list):
        con.print()
        con.print(
            _table(
                "workers",
                ("slot", "pid", "state", "healthy"),
                [
                    (
                        w.get("slot", ""),
                        w.get("pid", "-"),
                        w.get("state", ""),
                        "yes" if w.get("healthy") else "NO",
                    )
                    for w in status["workers"]
                ],
            )
        )
    skip = ("upstreams", "members", "workers")
    extra = {k: v for k, v in status.items() if k not in skip}
    if extra:
        con.print()
        con.print(_table("status", ("", ""), [(k, json.dumps(v)) for k, v in extra.items()]))


def percentile(buckets: Sequence[int], bounds: Sequence[float], q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile (None: no samples or beyond the last)."""
    total = sum(buckets)
    if not total:
        return None
    seen = 0
    for i, count in enumerate(buckets):
        seen += count
        if seen >= q * total:
            return bounds[i] if i < len(bounds) else None
    return None


def show_stats(stats: pb.GetStatsResponse) -> None:
    con = _console()
    rows = []
    for op in stats.ops:
        mean = op.latency_sum_seconds / op.count if op.count else None
        p99 = percentile(op.latency_buckets, stats.latency_bounds_seconds, 0.99)
        rows.append((
            op.op, op.count, human_size(op.bytes), op.errors,
            _seconds(mean) if mean is not None else "-",
            ("<=" + _seconds(p99)) if p99 is not None else ("-" if not op.count else ">10s"),
        ))  # fmt: skip
    con.print(_table(None, ("op", "requests", "bytes", "errors", "mean", "p99"), rows))
    con.print(
        f"connections: {stats.connections_open} open, {stats.connections_total} total; "
        f"in flight: {stats.in_flight}; protocol errors: {stats.protocol_errors}; "
        f"up {_seconds(stats.uptime_seconds)}"
    )


def show_members(
    members: Sequence[pb.Member], rebuild: pb.RebuildProgress | None, addr: str
) -> None:
    con = _console()
    con.print(
        _table(
            None,
            ("#", "uri", "state", "healthy"),
            [(m.index, m.uri, m.state, "yes" if m.healthy else "NO") for m in members],
        )
    )
    hint = trust_hint(members, addr)
    if hint:
        print(hint)
    for line in held_hints(members, addr):
        print(line)
    if rebuild is not None:
        show_progress(rebuild)


def trust_hint(members: Sequence[pb.Member], addr: str) -> str | None:
    """For a failed mirror or parity fan with members `ctl trust` would accept: what the
    operator can do (the fan will not guess which member holds the data). A member that left
    the array last missed no acknowledged write: that one is named first."""
    details = {m.index: json.loads(m.detail_json or "{}") for m in members}
    trustable = [i for i, d in details.items() if d.get("trustable")]
    if not trustable:
        return None
    complete = [i for i in trustable if details[i].get("complete")]
    best = (complete or trustable)[0]
    why = (
        "it left last and holds every acknowledged write"
        if complete
        else "none of them holds every acknowledged write: writes will be lost"
    )
    return (
        f"the array has failed and will not guess which member holds its data; member(s) "
        f"{', '.join(map(str, trustable))} reachable. To serve from member {best} ({why}): "
        f"nbdfabric ctl {addr} trust {best}"
    )


def held_hints(members: Sequence[pb.Member], addr: str) -> list[str]:
    """How to take back a member the operator marked faulty (`ctl faulty`): it stays out, even
    healthy, until replaced, by itself if need be; nothing else said so."""
    return [
        f"member {m.index} stays out until taken back: nbdfabric ctl {addr} replace "
        f"{m.index} '{m.uri}' (rebuilt in full)"
        for m in members
        if json.loads(m.detail_json or "{}").get("held")
    ]


def rebuild_subject(p: pb.RebuildProgress) -> str:
    """What a rebuild rebuilds: "member N", "parity recheck" (parity's own, after a crash of
    the fan), or "" when it does not say."""
    if p.HasField("member_index"):
        return f"member {p.member_index}"
    return "parity recheck" if json.loads(p.detail_json or "{}").get("kind") == "parity" else ""


def percent_done(p: pb.RebuildProgress) -> float:
    return 100.0 * p.done_bytes / p.total_bytes if p.total_bytes else 0.0


def show_progress(p: pb.RebuildProgress) -> None:
    if not p.running and not p.total_bytes:
        print("rebuild: idle")
        return
    pct = percent_done(p)
    subject = rebuild_subject(p)
    who = f" ({subject})" if subject == "parity recheck" else f" {subject}" if subject else ""
    throttle = (
        f", throttle {human_size(p.throttle_bytes_per_second)}/s"
        if p.throttle_bytes_per_second
        else ""
    )
    state = "running" if p.running else "done" if p.done_bytes >= p.total_bytes else "stopped"
    print(
        f"rebuild{who}: {state} {pct:.1f}% "
        f"({human_size(p.done_bytes)} of {human_size(p.total_bytes)}, "
        f"{human_size(p.rate_bytes_per_second)}/s{throttle})"
    )


def show_event(ev: pb.Event) -> None:
    when = datetime.fromtimestamp(ev.time.ToNanoseconds() / 1e9, UTC).strftime("%H:%M:%S.%f")
    detail = json.loads(ev.detail_json) if ev.detail_json else {}
    extra = f"  {json.dumps(detail)}" if detail else ""
    print(f"{when[:-3]} {ev.kind:<8} {ev.message}{extra}", flush=True)


# Commands ------------------------------------------------------------------------------------


def channel_target(addr: str) -> str:
    """What gRPC should dial for an ADDR as nodes print it (a bare path means a unix socket)."""
    return f"unix:{addr}" if addr.startswith("/") else addr


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output")  # fmt: skip
    p.add_argument("--timeout", type=seconds(), default=argparse.SUPPRESS, metavar="SECONDS",
                   help="give up after this long (default 10, replace 60; streams: "
                   "never)")  # fmt: skip
    return p


def ctl_parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(
        prog="nbdfabric ctl",
        description="Talk to a node's gRPC control endpoint (`nbdfabric node --control ADDR`).",
        parents=[common],
    )
    p.add_argument("addr", metavar="ADDR", help="HOST:PORT or unix:PATH")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    cmd("info", "kind, params, export, capabilities, URIs and upstreams")
    cmd("stats", "per-operation counters and latency")
    h = cmd("health", "the grpc.health.v1 status (exit 0 only when SERVING)")
    h.add_argument("--service", default="", help="service name (default: the whole node)")
    s = cmd("set", "change live params")
    s.add_argument("changes", nargs="+", metavar="KEY=VALUE")
    pa = cmd("pause", "hold new requests until resume (returns when none is in flight)")
    pa.add_argument("--flush", action="store_true", help="then make written data durable")
    cmd("resume", "release held requests")
    cmd("flush", "make written data durable")
    sh = cmd("shutdown", "drain, flush and exit")
    sh.add_argument("--grace", type=seconds(zero=True), default=0.0, metavar="SECONDS",
                    help="how long in-flight requests may take (default: the node's)")  # fmt: skip
    ev = cmd("events", "follow state, config and error events")
    ev.add_argument("--count", type=int, default=0, metavar="N", help="stop after N events")
    ev.add_argument("--current", action="store_true", help="start with the current state")
    cmd("members", "a fan's members and their state")
    r = cmd("replace", "swap member INDEX for a new upstream and rebuild it")
    r.add_argument("index", type=_index_arg)
    r.add_argument("uri")
    f = cmd("faulty", "stop using member INDEX (until `replace INDEX URI` takes it back)")
    f.add_argument("index", type=_index_arg)
    t = cmd("trust", "take member INDEX of a failed mirror or parity array as holding its data")
    t.add_argument("index", type=_index_arg)
    rb = cmd("rebuild", "show, start, stop or throttle a fan's rebuild")
    rb.add_argument("action", nargs="?", choices=("start", "stop", "watch"))
    rb.add_argument("--throttle", metavar="SIZE", help="bytes per second (e.g. 50M; 0: off)")
    return p


#: A member index as the request carries it (uint32): 99999999999 raised ValueError from
#: protobuf, a traceback, and -1 is no index.
_index_arg = whole(0, 2**32 - 1, name="INDEX")


def parse_changes(words: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` words for Configure (`ctl set`, `nbdfabric set`). A key given twice is an
    error, as on the node's command line (the last one silently won)."""
    changes: dict[str, str] = {}
    for item in words:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        if key in changes:
            raise ValueError(f"parameter '{key}' given twice")
        changes[key] = value
    return changes


class Failed(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def run_ctl(args: argparse.Namespace, channel: grpc.Channel) -> int:
    stub = pb_grpc.NodeServiceStub(channel)
    as_json = getattr(args, "json", False)
    timeout = getattr(args, "timeout", None)
    default = REPLACE_TIMEOUT if args.command == "replace" else 10.0
    unary = timeout if timeout is not None else default
    c = args.command

    if c == "health":
        return run_health(channel, args.service, unary, as_json)
    if c == "events":
        req = pb.WatchEventsRequest(send_current_state=args.current)
        return _stream(
            (r.event for r in stub.WatchEvents(req, timeout=timeout)),
            args.count, as_json, show_event,
        )  # fmt: skip
    if c == "rebuild" and args.action == "watch":
        stream = stub.WatchRebuild(pb.WatchRebuildRequest(), timeout=timeout)
        return _stream((r.progress for r in stream), 0, as_json, show_progress)

    result: Message
    show: Callable[[Any], None]
    if c == "info":
        result = stub.GetInfo(pb.GetInfoRequest(), timeout=unary)
        show = show_info
    elif c == "stats":
        result = stub.GetStats(pb.GetStatsRequest(), timeout=unary)
        show = show_stats
    elif c == "set":
        try:
            changes = parse_changes(args.changes)
        except ValueError as exc:
            raise Failed(str(exc), EXIT_USAGE) from None
        result = stub.Configure(pb.ConfigureRequest(changes=changes), timeout=unary)
        show = lambda r: print(  # noqa: E731
            ", ".join(f"{p.name}={shown(p)}" for p in r.params if p.name in changes)
        )

    elif c in ("pause", "resume", "flush", "shutdown"):
        if c == "pause":
            result = stub.Pause(pb.PauseRequest(flush=args.flush), timeout=unary)
        elif c == "resume":
            result = stub.Resume(pb.ResumeRequest(), timeout=unary)
        elif c == "flush":
            result = stub.Flush(pb.FlushRequest(), timeout=unary)
        else:
            result = stub.Shutdown(pb.ShutdownRequest(grace_seconds=args.grace), timeout=unary)
        done = {"pause": "paused", "resume": "resumed", "flush": "flushed",
                "shutdown": "shutting down"}[c]  # fmt: skip
        show = lambda r: print(done)  # noqa: E731

    elif c == "members":
        result = stub.ListMembers(pb.ListMembersRequest(), timeout=unary)
        show = lambda r: show_members(r.members, r.rebuild, args.addr)  # noqa: E731

    elif c in ("replace", "faulty", "trust"):
        if c == "replace":
            req_r = pb.ReplaceMemberRequest(index=args.index, uri=args.uri)
            result = stub.ReplaceMember(req_r, timeout=unary)
        elif c == "trust":
            result = stub.TrustMember(pb.TrustMemberRequest(index=args.index), timeout=unary)
        else:
            req_f = pb.MarkMemberFaultyRequest(index=args.index)
            result = stub.MarkMemberFaulty(req_f, timeout=unary)
        show = lambda r: show_members(r.members, None, args.addr)  # noqa: E731

    elif c == "rebuild":
        if args.action is None and args.throttle is None:
            members = stub.ListMembers(pb.ListMembersRequest(), timeout=unary)
            result = members.rebuild
        else:
            req = pb.SetRebuildRequest(
                action={"start": pb.REBUILD_ACTION_START, "stop": pb.REBUILD_ACTION_STOP}.get(
                    args.action or "", pb.REBUILD_ACTION_UNSPECIFIED
                )
            )
            if args.throttle is not None:
                try:
                    req.throttle_bytes_per_second = parse_size(args.throttle)
                except ValueError as exc:
                    raise Failed(f"--throttle {args.throttle}: {exc}", EXIT_USAGE) from None
            result = stub.SetRebuild(req, timeout=unary).progress
        show = show_progress
    else:  # pragma: no cover - argparse rejects unknown commands
        raise Failed(f"unknown command {c!r}", EXIT_USAGE)

    if as_json:
        _print_json(to_data(result))
    else:
        show(result)
    return 0


def _stream(items: Iterator[Any], count: int, as_json: bool, show: Any) -> int:
    seen = 0
    try:
        for item in items:
            if as_json:
                print(json.dumps(to_data(item)), flush=True)
            else:
                show(item)
            seen += 1
            if count and seen >= count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        cancel = getattr(items, "cancel", None)
        if cancel:
            cancel()
    return 0


_STATUS_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


def run_health(channel: grpc.Channel, service: str, timeout: float, as_json: bool) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    name = _STATUS_NAMES.get(reply.status, str(reply.status))
    if as_json:
        _print_json({"service": service, "status": name})
    else:
        print(name)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_FAILED


def _describe(exc: grpc.RpcError, addr: str, channel: grpc.Channel) -> tuple[str, int]:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and _connected(channel):
        return (
            f"the node at {addr} did not answer in time: it may still be at it (a replace "
            "waits for the new member's upstream); --timeout SECONDS waits longer",
            EXIT_FAILED,
        )
    if code in _UNREACHABLE:
        why = "timed out" if code == grpc.StatusCode.DEADLINE_EXCEEDED else _cause(details)
        return (
            f"cannot reach the node at {addr}: {why} (is it running with `--control ADDR`?)",
            EXIT_UNREACHABLE,
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return f"{details or 'not found'} (unknown health service name?)", EXIT_FAILED
    return f"{code.name if code else 'error'}: {details}", EXIT_FAILED


def _connected(channel: grpc.Channel) -> bool:
    """Whether the node at the other end is there (a call timed out on a live node)."""
    try:
        grpc.channel_ready_future(channel).result(timeout=1)
    except grpc.FutureTimeoutError:
        return False
    return True


def _cause(details: str) -> str:
    """The OS's reason in gRPC's connect failure, without its wrapping: "failed to connect to
    all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host:
    Connection refused" is "Connection refused"."""
    if details.startswith("failed to connect to all addresses") and ": " in details:
        return details.rsplit(": ", 1)[1]
    return details


def _with_channel(addr: str, prog: str, body: Any) -> int:
    with grpc.insecure_channel(channel_target(addr)) as channel:
        try:
            return int(body(channel))
        except grpc.RpcError as exc:
            message, status = _describe(exc, addr, channel)
        except Failed as exc:
            message, status = str(exc), exc.status
    print(f"{prog}: {message}", file=sys.stderr)
    return status


def health_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="nbdfabric health",
        description="Exit 0 when the node at ADDR is SERVING, else non-zero (1 not serving, "
        "3 unreachable). For docker compose healthchecks and Kubernetes exec probes.",
    )
    p.add_argument("addr", metavar="ADDR", help="the node's --control address")
    p.add_argument("--service", default="", help="service name (default: the whole node)")
    p.add_argument("--timeout", type=seconds(), default=2.0, metavar="SECONDS")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing, only exit")
    args = p.parse_args(argv)

    def body(channel: grpc.Channel) -> int:
        if args.quiet:
            stub = health_pb2_grpc.HealthStub(channel)
            req = health_pb2.HealthCheckRequest(service=args.service)
            reply = stub.Check(req, timeout=args.timeout)
            return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_FAILED
        return run_health(channel, args.service, args.timeout, args.json)

    return _with_channel(args.addr, "nbdfabric health", body)


def main(command: str, argv: Sequence[str]) -> int:
    if command == "health":
        return health_main(argv)
    args = ctl_parser().parse_args(argv)
    return _with_channel(args.addr, f"nbdfabric ctl {args.command}", lambda ch: run_ctl(args, ch))
