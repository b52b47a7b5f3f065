"""The sans-IO protocol core against the spec: fuzzed byte streams, option edge cases, and every
reply encoder decoded back by a small independent decoder written here.
"""

from __future__ import annotations

import functools
import itertools
import operator
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes.protocol.constants import (
    BASE_ALLOCATION,
    FLAGS_VALID_FOR,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    CmdFlag,
    Err,
    Info,
    Opt,
    Rep,
    TFlag,
)
from nodes.protocol.errors import ProtocolError
from nodes.protocol.handshake import (
    NEED_DATA,
    Closed,
    Event,
    ExportInfo,
    HandshakePolicy,
    Ready,
    ServerHandshake,
    StartTLS,
    block_sizes,
)
from nodes.protocol.transmission import (
    Request,
    RequestParser,
    Transmission,
    block_status_chunk,
    chunk,
    clip_extents,
    context_merge,
    cover,
    data_chunk_header,
    error_chunk,
    hole_chunk,
    none_chunk,
    simple_reply,
    validate,
)

EXPORT = ExportInfo("disk", 1 << 20, TFlag.SEND_FLUSH | TFlag.SEND_FUA | TFlag.SEND_DF)


def lookup(name: str) -> ExportInfo | None:
    return EXPORT if name in ("", "disk") else None


def policy(**kw: object) -> HandshakePolicy:
    return HandshakePolicy(lookup=lookup, listing=lambda: [EXPORT], **kw)  # type: ignore[arg-type]


# A tiny client side: frames in, decoded option replies out -----------------------------------


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def info_data(name: str = "", requests: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(requests))
        + b"".join(struct.pack(">H", r) for r in requests)
    )


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


@dataclass
class OptReply:
    option: int
    rep: int
    data: bytes


def decode_opt_replies(raw: bytes) -> list[OptReply]:
    out, pos = [], 0
    while pos < len(raw):
        magic, option, rep, length = struct.unpack_from(">QIII", raw, pos)
        assert magic == OPT_REPLY_MAGIC
        pos += 20
        out.append(OptReply(option, rep, raw[pos : pos + length]))
        assert len(out[-1].data) == length
        pos += length
    return out


class Client:
    """Drives a ServerHandshake: checks the greeting, sends client flags, collects replies."""

    def __init__(self, pol: HandshakePolicy | None = None, flags: int = 3) -> None:
        self.hs = ServerHandshake(pol or policy())
        greeting = self.hs.data_to_send()
        magic, ihaveopt, server_flags = struct.unpack(">QQH", greeting)
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        assert server_flags & ~3 == 0 and server_flags & 1  # only FIXED_NEWSTYLE, NO_ZEROES
        self.hs.receive_data(struct.pack(">I", flags))

    def send(self, data: bytes) -> tuple[Event, list[OptReply]]:
        self.hs.receive_data(data)
        event = self.hs.next_event()
        raw = self.hs.data_to_send()
        if not raw.startswith(struct.pack(">Q", OPT_REPLY_MAGIC)):
            return event, []  # EXPORT_NAME's reply, or nothing
        return event, decode_opt_replies(raw)


# Fuzz: arbitrary bytes never raise anything -------------------------------------------------


def drive(hs: ServerHandshake, pieces: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for piece in pieces:
        hs.receive_data(piece)
        while True:
            event = hs.next_event()
            hs.data_to_send()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, StartTLS):
                hs.tls_started()
                hs.receive_data(event.leftover)  # a TLS layer that decrypts to the same bytes
                continue
            if isinstance(event, Ready | Closed):
                return events
    return events


def structured_prefix() -> st.SearchStrategy[bytes]:
    """Mostly-valid option frames, so the fuzzer gets past the first header."""
    option = st.sampled_from([*range(0, 13), 0x7FFFFFFF, 0xFFFFFFFF])
    data = st.one_of(
        st.binary(max_size=40),
        st.builds(
            info_data, st.sampled_from(["", "disk", "x"]), st.lists(st.integers(0, 5)).map(tuple)
        ),
        st.builds(
            meta_data,
            st.sampled_from(["", "disk"]),
            st.lists(st.sampled_from(["base:", BASE_ALLOCATION, "qemu:x", ""])),
        ),
    )
    frame = st.builds(opt, option, data)
    return st.builds(
        lambda flags, frames, tail: struct.pack(">I", flags) + b"".join(frames) + tail,
        st.sampled_from([0, 1, 2, 3, 4]),
        st.lists(frame, max_size=6),
        st.binary(max_size=40),
    )


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("tls", ["off", "on", "require"])
@FUZZ
@given(data=st.one_of(st.binary(max_size=300), structured_prefix()))
def test_handshake_fuzz_never_raises(tls: str, data: bytes) -> None:
    whole = drive(ServerHandshake(policy(tls=tls)), [data])
    bytewise = drive(ServerHandshake(policy(tls=tls)), [data[i : i + 1] for i in range(len(data))])
    # Feeding the same bytes at once or one by one must end the same way.
    assert [type(e) for e in whole] == [type(e) for e in bytewise]
    for event in whole:
        assert isinstance(event, StartTLS | Ready | Closed)


T = Transmission(size=1 << 20, tflags=TFlag.SEND_FLUSH | TFlag.SEND_FUA, structured=True,
                 meta_contexts=(1,))  # fmt: skip


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def request_stream() -> st.SearchStrategy[bytes]:
    req = st.builds(
        lambda cmd, flags, off, length, junk: request(cmd, off, length, flags) + junk,
        st.integers(0, 12),
        st.integers(0, 0xFFFF),
        st.integers(0, 2**64 - 1),
        st.integers(0, 64),
        st.binary(max_size=64),
    )
    return st.builds(lambda reqs, tail: b"".join(reqs) + tail, st.lists(req, max_size=5),
                     st.binary(max_size=40))  # fmt: skip


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), request_stream()))
def test_request_parser_fuzz_only_protocol_errors(data: bytes) -> None:
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        parser = RequestParser(T)
        try:
            for piece in pieces:
                parser.receive_data(piece)
                for event in parser.events():
                    assert isinstance(event.error, Err)
                    if event.request.cmd == Cmd.WRITE:
                        assert len(event.payload) == event.request.length
        except ProtocolError:
            pass


# Option edge cases ---------------------------------------------------------------------------


def test_handshake_unknown_option_is_unsup_and_parsing_continues() -> None:
    c = Client()
    event, replies = c.send(opt(99, b"ignored data") + opt(Opt.LIST))
    assert event is NEED_DATA
    assert [r.rep for r in replies] == [Rep.ERR_UNSUP, Rep.SERVER, Rep.ACK]
    assert replies[0].option == 99


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (opt(Opt.LIST, b"x"), Rep.ERR_INVALID),
        (opt(Opt.INFO, b"\0\0\0\x05ab"), Rep.ERR_INVALID),  # name longer than the data
        (opt(Opt.INFO, info_data("disk") + b"extra"), Rep.ERR_INVALID),
        (opt(Opt.GO, info_data("disk")[:-1]), Rep.ERR_INVALID),  # count field cut short
        (opt(Opt.GO, b"\0\0\0\0\0\x02\0\x01"), Rep.ERR_INVALID),  # 2 requests, 1 present
        (opt(Opt.INFO, info_data("nope")), Rep.ERR_UNKNOWN),
        (opt(Opt.INFO, info_data("\xff")[:-2] + b"\xff\0\0"), Rep.ERR_INVALID),
        # Strings (names too) MUST have no NUL and at most 4096 bytes: malformed, not unknown.
        (opt(Opt.INFO, info_data("a\0b")), Rep.ERR_INVALID),
        (opt(Opt.INFO, info_data("x" * 4097)), Rep.ERR_INVALID),
        (opt(Opt.STRUCTURED_REPLY, b"x"), Rep.ERR_INVALID),
        (opt(Opt.STARTTLS), Rep.ERR_UNSUP),  # tls=off
        (opt(Opt.PEEK_EXPORT), Rep.ERR_UNSUP),
        (opt(Opt.EXTENDED_HEADERS), Rep.ERR_UNSUP),
        (opt(Opt.SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION])), Rep.ERR_INVALID),
        (opt(Opt.LIST_META_CONTEXT, meta_data("disk", [])), Rep.ERR_INVALID),
    ],
)
def test_handshake_option_errors(frame: bytes, expected: Rep) -> None:
    event, replies = Client().send(frame)
    assert event is NEED_DATA, "an option error must not end the handshake"
    assert [r.rep for r in replies] == [expected]
    # ...and the next option still works.
    event, replies = Client().send(frame + opt(Opt.LIST))
    assert [r.rep for r in replies][-1] == Rep.ACK


def test_handshake_info_then_go() -> None:
    c = Client()
    event, replies = c.send(opt(Opt.INFO, info_data("disk", (Info.NAME, Info.BLOCK_SIZE, 77))))
    assert event is NEED_DATA
    assert replies[-1].rep == Rep.ACK
    infos = {struct.unpack(">H", r.data[:2])[0]: r.data for r in replies if r.rep == Rep.INFO}
    size, tflags = struct.unpack(">QH", infos[Info.EXPORT][2:])
    assert size == 1 << 20 and tflags & TFlag.HAS_FLAGS
    assert not tflags & TFlag.SEND_DF, "DF must be clear without structured replies"
    assert infos[Info.NAME][2:] == b"disk"
    event, go = c.send(opt(Opt.GO, info_data("disk", (Info.NAME, Info.BLOCK_SIZE, 77))))
    assert isinstance(event, Ready)
    assert event.export.name == "disk"
    # Spec: an INFO then GO with the same parameters MUST give identical information.
    assert [r.data for r in go if r.rep == Rep.INFO] == [
        r.data for r in replies if r.rep == Rep.INFO
    ]


def test_handshake_block_sizes_sent_only_for_an_export_that_has_them() -> None:
    """An export with block size constraints announces them (NBD_INFO_BLOCK_SIZE), even to a
    client that did not ask, as the spec allows; one without (block_min 0) announces none."""
    from dataclasses import replace

    def block_sizes_sent(replies: list[OptReply]) -> list[tuple[int, ...]]:
        infos = [r.data for r in replies if r.rep == Rep.INFO]
        kind = struct.pack(">H", Info.BLOCK_SIZE)
        return [struct.unpack(">HIII", data)[1:] for data in infos if data[:2] == kind]

    sized = replace(EXPORT, block_min=512, block_preferred=4096, block_max=1 << 20)
    for export, expected in ((EXPORT, []), (sized, [(512, 4096, 1 << 20)])):
        c = Client(HandshakePolicy(lookup=lambda name: export))  # noqa: B023 (used at once)
        _, replies = c.send(opt(Opt.INFO, info_data("disk", (Info.BLOCK_SIZE,))))
        assert block_sizes_sent(replies) == expected
        _, replies = c.send(opt(Opt.GO, info_data("disk")))  # not asked for
        assert block_sizes_sent(replies) == expected


def test_handshake_description_sent_when_asked_and_only_then() -> None:
    """NBD_INFO_DESCRIPTION: the export's description, for a client that asks for it. The spec
    lets a server send it unasked; like nbdkit, we do not (a client that did not ask has no
    use for it)."""
    from dataclasses import replace

    described = replace(EXPORT, description="a test disk")
    kind = struct.pack(">H", Info.DESCRIPTION)
    for asked in ((Info.DESCRIPTION,), ()):
        c = Client(HandshakePolicy(lookup=lambda name: described))
        _, replies = c.send(opt(Opt.INFO, info_data("disk", asked)))
        assert replies[-1].rep == Rep.ACK
        sent = [r.data for r in replies if r.rep == Rep.INFO and r.data[:2] == kind]
        assert sent == ([kind + b"a test disk"] if asked else [])


def test_handshake_structured_reply_twice_gets_one_error_and_stays_negotiated() -> None:
    # Every option gets a final reply; a second STRUCTURED_REPLY is an error, not ignored.
    c = Client()
    c.send(opt(Opt.STRUCTURED_REPLY))
    _, replies = c.send(opt(Opt.STRUCTURED_REPLY))
    assert [r.rep for r in replies] == [Rep.ERR_INVALID]
    event, _ = c.send(opt(Opt.GO, info_data("disk")))
    assert isinstance(event, Ready) and event.structured


def test_handshake_go_leftover_bytes_kept() -> None:
    c = Client()
    event, _ = c.send(opt(Opt.GO, info_data("")) + b"first request")
    assert isinstance(event, Ready) and event.leftover == b"first request"


def test_handshake_meta_context_needs_structured_replies_first() -> None:
    c = Client()
    _, replies = c.send(opt(Opt.SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION])))
    assert [r.rep for r in replies] == [Rep.ERR_INVALID]
    _, replies = c.send(opt(Opt.STRUCTURED_REPLY))
    assert [r.rep for r in replies] == [Rep.ACK]
    _, replies = c.send(opt(Opt.SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION, "qemu:x"])))
    assert [r.rep for r in replies] == [Rep.META_CONTEXT, Rep.ACK]
    context_id = struct.unpack(">I", replies[0].data[:4])[0]
    assert replies[0].data[4:] == BASE_ALLOCATION.encode()
    event, _ = c.send(opt(Opt.GO, info_data("disk")))
    assert isinstance(event, Ready)
    assert event.structured and event.meta_contexts == (context_id,)


def test_handshake_meta_context_for_another_export_is_not_kept() -> None:
    c = Client()
    c.send(opt(Opt.STRUCTURED_REPLY))
    c.send(opt(Opt.SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION])))
    event, _ = c.send(opt(Opt.GO, info_data("")))
    assert isinstance(event, Ready) and event.meta_contexts == ()


@pytest.mark.parametrize(
    ("option", "queries", "listed"),
    [
        (Opt.LIST_META_CONTEXT, ["base:"], True),  # wildcard in LIST
        (Opt.LIST_META_CONTEXT, [], True),  # no query lists everything
        (Opt.LIST_META_CONTEXT, ["qemu:dirty-bitmap:x"], False),
        (Opt.SET_META_CONTEXT, ["base:"], False),  # no wildcard in SET
        (Opt.SET_META_CONTEXT, [], False),  # 0 queries selects none
        (Opt.SET_META_CONTEXT, [BASE_ALLOCATION], True),
    ],
)
def test_handshake_meta_context_queries(option: Opt, queries: list[str], listed: bool) -> None:
    c = Client()
    c.send(opt(Opt.STRUCTURED_REPLY))
    _, replies = c.send(opt(option, meta_data("disk", queries)))
    names = [r.data[4:].decode() for r in replies if r.rep == Rep.META_CONTEXT]
    assert names == ([BASE_ALLOCATION] if listed else [])
    assert replies[-1].rep == Rep.ACK


def test_handshake_failed_set_meta_context_clears_selection() -> None:
    c = Client()
    c.send(opt(Opt.STRUCTURED_REPLY))
    c.send(opt(Opt.SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION])))
    _, replies = c.send(opt(Opt.SET_META_CONTEXT, b"\0\0\0\x09short"))
    assert [r.rep for r in replies] == [Rep.ERR_INVALID]
    event, _ = c.send(opt(Opt.GO, info_data("disk")))
    assert isinstance(event, Ready) and event.meta_contexts == ()


def _meta_head(name: bytes = b"disk") -> bytes:
    return struct.pack(">I", len(name)) + name


@pytest.mark.parametrize("option", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_meta_head() + struct.pack(">II", 1, 50) + b"base:", id="query-past-end"),
        pytest.param(_meta_head() + struct.pack(">II", 2, 5) + b"base:", id="count-past-end"),
        pytest.param(_meta_head() + b"\0\0", id="count-cut-short"),
        pytest.param(b"\0\0\0\x09short", id="name-past-end"),
        pytest.param(meta_data("disk", [BASE_ALLOCATION]) + b"x", id="trailing-bytes"),
        pytest.param(_meta_head() + struct.pack(">II", 1, 2) + b"\xff\xfe", id="query-not-utf8"),
    ],
)
def test_handshake_malformed_meta_context_request_is_invalid(option: Opt, data: bytes) -> None:
    # Spec, NBD_OPT_LIST_META_CONTEXT: a syntactically invalid request (a query running past
    # the option's length) MUST fail with NBD_REP_ERR_INVALID, and sends no context.
    c = Client()
    c.send(opt(Opt.STRUCTURED_REPLY))
    _, replies = c.send(opt(option, data))
    assert [r.rep for r in replies] == [Rep.ERR_INVALID]
    _, replies = c.send(opt(Opt.LIST))  # and negotiation goes on
    assert replies[-1].rep == Rep.ACK


def test_handshake_error_messages_are_whole_utf8_strings() -> None:
    # Spec, Conventions: strings (error messages too) are UTF-8 and at most 4096 bytes. A
    # message quoting a 4096-byte name must be cut, and not inside a character.
    name = "\u00e9" * 2048
    _, replies = Client().send(opt(Opt.INFO, info_data(name)))
    assert [r.rep for r in replies] == [Rep.ERR_UNKNOWN]
    assert len(replies[0].data) <= 4096
    assert replies[0].data.decode().startswith("no export named")


def test_handshake_option_count_cap() -> None:
    c = Client()
    for _ in range(MAX_OPTIONS):
        event, replies = c.send(opt(Opt.INFO, info_data("disk")))
        assert event is NEED_DATA and replies[-1].rep == Rep.ACK
    event, _ = c.send(opt(Opt.INFO, info_data("disk")))
    assert isinstance(event, Closed) and not event.soft


def test_handshake_option_cap_grows_once_by_two_per_listed_export() -> None:
    many = [ExportInfo(f"disk{i}", 4096, TFlag(0)) for i in range(48)]
    c = Client(HandshakePolicy(lookup=lambda name: many[0], listing=lambda: many))
    budget = MAX_OPTIONS + 2 * len(many)  # what nbdinfo --list needs: LIST, then 2 per export
    for _ in range(budget):  # LISTs again do not grow it further
        event, replies = c.send(opt(Opt.LIST))
        assert event is NEED_DATA and replies[-1].rep == Rep.ACK
    event, _ = c.send(opt(Opt.INFO, info_data("disk0")))
    assert isinstance(event, Closed) and not event.soft


def test_handshake_option_length_cap() -> None:
    event, _ = Client().send(struct.pack(">QII", IHAVEOPT, Opt.LIST, MAX_OPTION_LENGTH + 1))
    assert isinstance(event, Closed)
    # Exactly the cap is still read (and answered), not dropped.
    c = Client()
    c.hs.receive_data(struct.pack(">QII", IHAVEOPT, 99, MAX_OPTION_LENGTH))
    assert c.hs.next_event() is NEED_DATA


@pytest.mark.parametrize("flags", [4, 1 << 31, 0xFFFFFFFF, 5])
def test_handshake_unknown_client_flags_close(flags: int) -> None:
    hs = ServerHandshake(policy())
    hs.receive_data(struct.pack(">I", flags))
    assert isinstance(hs.next_event(), Closed)


def test_handshake_no_zeroes_refused_when_not_offered() -> None:
    hs = ServerHandshake(policy(no_zeroes=False))
    hs.receive_data(struct.pack(">I", 3))
    assert isinstance(hs.next_event(), Closed)


def test_handshake_bad_option_magic_closes() -> None:
    event, _ = Client().send(struct.pack(">QII", 0x1234, Opt.LIST, 0))
    assert isinstance(event, Closed)


@pytest.mark.parametrize(
    "frame",
    [
        opt(Opt.LIST),
        opt(Opt.INFO, info_data("disk")),
        opt(Opt.GO, info_data("disk")),
        opt(Opt.STRUCTURED_REPLY),
        opt(Opt.LIST_META_CONTEXT, meta_data("disk", [])),
        opt(Opt.SET_META_CONTEXT, meta_data("disk", [])),
        opt(99),
    ],
)
def test_handshake_tls_required_for_everything_but_starttls(frame: bytes) -> None:
    c = Client(policy(tls="require"))
    event, replies = c.send(frame)
    assert event is NEED_DATA
    assert [r.rep for r in replies] == [Rep.ERR_TLS_REQD]
    event, replies = c.send(opt(Opt.STARTTLS))
    assert isinstance(event, StartTLS) and [r.rep for r in replies] == [Rep.ACK]
    c.hs.tls_started()
    event, replies = c.send(frame)
    assert not any(r.rep == Rep.ERR_TLS_REQD for r in replies)


def test_handshake_tls_required_export_name_disconnects() -> None:
    event, _ = Client(policy(tls="require")).send(opt(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(event, Closed)


def test_handshake_tls_required_abort_is_acked() -> None:
    event, replies = Client(policy(tls="require")).send(opt(Opt.ABORT))
    assert isinstance(event, Closed) and event.soft
    assert [r.rep for r in replies] == [Rep.ACK]


def test_handshake_starttls_twice_is_invalid_and_wipes_state() -> None:
    c = Client(policy(tls="on"))
    c.send(opt(Opt.STRUCTURED_REPLY))
    event, _ = c.send(opt(Opt.STARTTLS))
    assert isinstance(event, StartTLS)
    c.hs.tls_started()
    assert not c.hs.structured, "STARTTLS must forget structured replies"
    _, replies = c.send(opt(Opt.STARTTLS))
    assert [r.rep for r in replies] == [Rep.ERR_INVALID]


def test_handshake_starttls_leaves_what_follows_it_to_tls() -> None:
    """Bytes behind STARTTLS came before TLS: they go to the TLS layer (as a ClientHello would),
    never answered as options (plaintext injected there would count as sent over TLS)."""
    c = Client(policy(tls="require"))
    event, replies = c.send(opt(Opt.STARTTLS) + opt(Opt.STRUCTURED_REPLY))
    assert isinstance(event, StartTLS) and [r.rep for r in replies] == [Rep.ACK]
    assert event.leftover == opt(Opt.STRUCTURED_REPLY)
    c.hs.tls_started()
    assert c.hs.next_event() is NEED_DATA and c.hs.data_to_send() == b""
    assert not c.hs.structured


def test_handshake_shutdown_answers_err_shutdown() -> None:
    c = Client()
    c.hs.shutting_down = True
    for frame in (opt(Opt.LIST), opt(Opt.GO, info_data("disk")), opt(99)):
        event, replies = c.send(frame)
        assert event is NEED_DATA and [r.rep for r in replies] == [Rep.ERR_SHUTDOWN]
    event, _ = c.send(opt(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(event, Closed)


def test_handshake_non_fixed_client_only_export_name() -> None:
    c = Client(flags=0)
    _, replies = c.send(opt(Opt.LIST))
    assert [r.rep for r in replies] == [Rep.ERR_INVALID]
    c.hs.receive_data(opt(Opt.EXPORT_NAME, b"disk"))
    event = c.hs.next_event()
    assert isinstance(event, Ready)
    size, tflags = struct.unpack(">QH", c.hs.data_to_send()[:10])
    assert size == 1 << 20 and tflags & TFlag.HAS_FLAGS


@pytest.mark.parametrize(("client_flags", "padding"), [(1, 124), (3, 0)])
def test_handshake_export_name_padding(client_flags: int, padding: int) -> None:
    c = Client(flags=client_flags)
    c.hs.receive_data(opt(Opt.EXPORT_NAME, b""))
    assert isinstance(c.hs.next_event(), Ready)
    out = c.hs.data_to_send()
    assert len(out) == 10 + padding and out[10:] == bytes(padding)


@pytest.mark.parametrize("name", [b"nope", b"\xff\xfe", b"a\0b", b"x" * 5000])
def test_handshake_export_name_failure_disconnects(name: bytes) -> None:
    c = Client()
    c.hs.receive_data(opt(Opt.EXPORT_NAME, name))
    assert isinstance(c.hs.next_event(), Closed)


def test_handshake_after_done_stays_closed() -> None:
    c = Client()
    c.send(opt(Opt.ABORT))
    assert isinstance(c.hs.next_event(), Closed)


# Transmission validation ---------------------------------------------------------------------

FULL = Transmission(
    size=1 << 20,
    tflags=TFlag(0xFFF) & ~TFlag.READ_ONLY & ~TFlag.SEND_RESIZE,
    structured=True,
    meta_contexts=(1,),
    block_min=1,
    block_max=1 << 20,
)
RO = Transmission(size=1 << 20, tflags=TFlag.READ_ONLY | TFlag.SEND_FUA, structured=True,
                  meta_contexts=(1,))  # fmt: skip
SIMPLE = Transmission(size=1 << 20, tflags=FULL.tflags, structured=False, meta_contexts=())
ALIGNED = Transmission(size=1 << 20, tflags=FULL.tflags, structured=True, meta_contexts=(1,),
                       block_min=512, block_max=65536)  # fmt: skip
BARE = Transmission(size=1 << 20, tflags=TFlag.HAS_FLAGS, structured=True, meta_contexts=())
END = 1 << 20
#: No block sizes given: READ and WRITE are held to 32 MiB, the spec's limit for a client that
#: wants to interoperate and saw no constraints.
UNSIZED = Transmission(size=1 << 30, tflags=FULL.tflags, structured=True, meta_contexts=(1,))


@pytest.mark.parametrize(
    ("t", "cmd", "offset", "length", "flags", "expected"),
    [
        (FULL, Cmd.READ, 0, 4096, 0, Err.OK),
        (FULL, Cmd.READ, END - 1, 2, 0, Err.EINVAL),
        (FULL, Cmd.WRITE, END - 1, 2, 0, Err.ENOSPC),
        (FULL, Cmd.WRITE_ZEROES, END, 1, 0, Err.ENOSPC),
        (FULL, Cmd.TRIM, END, 1, 0, Err.EINVAL),
        (FULL, Cmd.BLOCK_STATUS, END, 1, 0, Err.EINVAL),
        (FULL, Cmd.CACHE, END, 1, 0, Err.EINVAL),
        (FULL, Cmd.READ, 2**64 - 1, 1, 0, Err.EINVAL),  # offset + length overflows u64
        (FULL, Cmd.WRITE, 2**64 - 512, 1024, 0, Err.ENOSPC),
        (FULL, Cmd.READ, END, 0, 0, Err.OK),  # zero length at the very end
        (FULL, Cmd.WRITE, 0, 0, 0, Err.OK),
        (FULL, Cmd.TRIM, 0, 0, 0, Err.OK),
        (FULL, Cmd.WRITE_ZEROES, 0, 0, 0, Err.OK),
        (FULL, Cmd.BLOCK_STATUS, 0, 0, 0, Err.EINVAL),
        (FULL, Cmd.FLUSH, 0, 0, 0, Err.OK),
        (FULL, Cmd.FLUSH, 0, 1, 0, Err.EINVAL),
        (FULL, Cmd.FLUSH, 1, 0, 0, Err.EINVAL),
        (FULL, 8, 0, 0, 0, Err.EINVAL),  # unknown command
        (FULL, 0xFFFF, 0, 0, 0, Err.EINVAL),
        (FULL, Cmd.READ, 0, 1, 1 << 5, Err.EINVAL),  # unknown flag
        (FULL, Cmd.READ, 0, 1, 1 << 15, Err.EINVAL),
        (FULL, Cmd.WRITE, 0, 1, CmdFlag.DF, Err.EINVAL),  # DF only on READ
        (FULL, Cmd.READ, 0, 1, CmdFlag.NO_HOLE, Err.EINVAL),
        (FULL, Cmd.READ, 0, 1, CmdFlag.REQ_ONE, Err.EINVAL),
        (FULL, Cmd.WRITE, 0, 1, CmdFlag.FAST_ZERO, Err.EINVAL),
        (FULL, Cmd.WRITE_ZEROES, 0, 1, CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE, Err.OK),
        (FULL, Cmd.BLOCK_STATUS, 0, 1, CmdFlag.REQ_ONE, Err.OK),
        (FULL, Cmd.READ, 0, 1, CmdFlag.DF | CmdFlag.FUA, Err.OK),  # FUA allowed on anything
        (FULL, Cmd.READ, 0, (1 << 20) + 1, 0, Err.EINVAL),
        (FULL, Cmd.READ, 0, 2**32 - 1, 0, Err.EINVAL),
        (SIMPLE, Cmd.READ, 0, 1, CmdFlag.DF, Err.EINVAL),  # DF needs structured replies
        (SIMPLE, Cmd.BLOCK_STATUS, 0, 1, 0, Err.EINVAL),
        (RO, Cmd.WRITE, 0, 1, 0, Err.EPERM),
        (RO, Cmd.WRITE_ZEROES, 0, 1, 0, Err.EPERM),
        (RO, Cmd.TRIM, 0, 1, 0, Err.EPERM),
        (RO, Cmd.READ, 0, 1, CmdFlag.FUA, Err.OK),
        (BARE, Cmd.READ, 0, 1, CmdFlag.FUA, Err.EINVAL),  # FUA not advertised
        (BARE, Cmd.FLUSH, 0, 0, 0, Err.EINVAL),
        (BARE, Cmd.TRIM, 0, 1, 0, Err.EINVAL),
        (BARE, Cmd.WRITE_ZEROES, 0, 1, 0, Err.EINVAL),
        (BARE, Cmd.CACHE, 0, 1, 0, Err.EINVAL),
        (BARE, Cmd.BLOCK_STATUS, 0, 1, 0, Err.EINVAL),  # no meta context selected
        (ALIGNED, Cmd.READ, 512, 1024, 0, Err.OK),
        (ALIGNED, Cmd.READ, 1, 512, 0, Err.EINVAL),
        (ALIGNED, Cmd.WRITE, 0, 100, 0, Err.EINVAL),
        (ALIGNED, Cmd.READ, 0, 131072, CmdFlag.DF, Err.EOVERFLOW),
        (UNSIZED, Cmd.WRITE, 0, 32 << 20, 0, Err.OK),
        (UNSIZED, Cmd.READ, 0, (32 << 20) + 1, 0, Err.EINVAL),
    ],
)
def test_validate_table(
    t: Transmission, cmd: int, offset: int, length: int, flags: int, expected: Err
) -> None:
    assert validate(Request(flags, cmd, 1, offset, length), t) is expected


def reference_validate(req: Request, t: Transmission) -> Err:
    """The validation rules written plainly, one check per spec sentence: the oracle for the
    table-driven `validate` the server runs."""
    cmd, flags, tf = req.cmd, req.flags, t.tflags
    if cmd not in set(Cmd):
        return Err.EINVAL
    # int(): ~ of an IntFlag keeps only the defined bits, which would hide unknown flags
    all_flags = int(
        CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE | CmdFlag.FAST_ZERO
    )
    if flags & ~all_flags or flags & ~FLAGS_VALID_FOR[Cmd(cmd)]:
        return Err.EINVAL
    if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) and tf & TFlag.READ_ONLY:
        return Err.EPERM
    if flags & CmdFlag.FUA and not tf & TFlag.SEND_FUA:
        return Err.EINVAL
    if flags & CmdFlag.DF and not (t.structured and tf & TFlag.SEND_DF):
        return Err.EINVAL
    if flags & CmdFlag.FAST_ZERO and not tf & TFlag.SEND_FAST_ZERO:
        return Err.EINVAL
    if cmd == Cmd.FLUSH:
        if not tf & TFlag.SEND_FLUSH or req.offset or req.length:
            return Err.EINVAL
        return Err.OK
    if cmd == Cmd.DISC:
        return Err.OK
    if (
        (cmd == Cmd.TRIM and not tf & TFlag.SEND_TRIM)
        or (cmd == Cmd.WRITE_ZEROES and not tf & TFlag.SEND_WRITE_ZEROES)
        or (cmd == Cmd.CACHE and not tf & TFlag.SEND_CACHE)
        or (cmd == Cmd.BLOCK_STATUS and not (t.structured and t.meta_contexts))
    ):
        return Err.EINVAL
    if req.offset + req.length > t.size:
        return Err.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Err.EINVAL
    if req.length == 0:
        return Err.EINVAL if cmd == Cmd.BLOCK_STATUS else Err.OK
    if t.block_min > 1 and (req.offset % t.block_min or req.length % t.block_min):
        return Err.EINVAL
    if cmd in (Cmd.READ, Cmd.WRITE) and req.length > t.block_max:
        return Err.EOVERFLOW if flags & CmdFlag.DF else Err.EINVAL
    return Err.OK


@settings(max_examples=2000, deadline=None)
@given(
    tflags=st.integers(0, 0xFFF),
    structured=st.booleans(),
    contexts=st.sampled_from([(), (1,)]),
    block_min=st.sampled_from([1, 2, 512, 4096]),
    block_max=st.sampled_from([4096, 65536, 1 << 25]),
    cmd=st.integers(0, 9),
    flags=st.one_of(st.integers(0, 0x1F), st.integers(0, 0xFFFF)),
    offset=st.one_of(st.integers(0, 1 << 21), st.sampled_from([0, 512, (1 << 20) - 1, 2**64 - 1])),
    length=st.one_of(st.integers(0, 1 << 21), st.sampled_from([0, 1, 512, 4096, 2**32 - 1])),
)
def test_validate_agrees_with_the_plain_rules(
    tflags: int, structured: bool, contexts: tuple[int, ...], block_min: int, block_max: int,
    cmd: int, flags: int, offset: int, length: int,
) -> None:  # fmt: skip
    t = Transmission(size=1 << 20, tflags=TFlag(tflags), structured=structured,
                     meta_contexts=contexts, block_min=block_min, block_max=block_max)  # fmt: skip
    req = Request(flags, cmd, 1, offset, length)
    assert validate(req, t) is reference_validate(req, t)


def test_request_parser_consumes_rejected_write_payload() -> None:
    parser = RequestParser(RO)
    parser.receive_data(request(Cmd.WRITE, 0, 5) + b"hello" + request(Cmd.READ, 0, 5, cookie=9))
    events = parser.events()
    assert [(e.request.cmd, e.error) for e in events] == [
        (Cmd.WRITE, Err.EPERM),
        (Cmd.READ, Err.OK),
    ]
    assert events[0].payload == b"hello" and events[1].request.cookie == 9


def test_request_parser_waits_for_whole_payload_then_disc_ends() -> None:
    parser = RequestParser(FULL)
    parser.receive_data(request(Cmd.WRITE, 0, 4) + b"ab")
    assert parser.events() == []
    parser.receive_data(b"cd" + request(Cmd.DISC) + request(Cmd.READ, 0, 1))
    events = parser.events()
    assert [e.request.cmd for e in events] == [Cmd.WRITE, Cmd.DISC]
    assert parser.events() == []


def test_request_parser_reads_requests_without_payloads_back_to_back() -> None:
    parser = RequestParser(FULL)
    parser.receive_data(request(Cmd.READ, 0, 512, cookie=1) + request(Cmd.FLUSH, cookie=2)
                        + request(Cmd.READ, 512, 512, cookie=3))  # fmt: skip
    assert [(e.request.cookie, e.error, e.payload) for e in parser.events()] == [
        (1, Err.OK, b""), (2, Err.OK, b""), (3, Err.OK, b"")]  # fmt: skip


def test_request_parser_bad_magic_is_protocol_error() -> None:
    parser = RequestParser(FULL)
    parser.receive_data(struct.pack(">IHHQQI", 0x12560953, 0, 0, 1, 0, 1))
    with pytest.raises(ProtocolError):
        parser.events()


# Reply encoders round-trip through an independent decoder ------------------------------------


@dataclass
class Decoded:
    kind: str  #: simple | chunk
    cookie: int
    error: int = 0
    flags: int = 0
    type: int = 0
    payload: bytes = b""


def decode_reply(raw: bytes, data_len: int = 0) -> tuple[Decoded, bytes]:
    """One reply off the front of `raw`; `data_len` bytes follow a simple READ reply."""
    (magic,) = struct.unpack_from(">I", raw)
    if magic == SIMPLE_REPLY_MAGIC:
        _, error, cookie = struct.unpack_from(">IIQ", raw)
        return Decoded("simple", cookie, error, payload=raw[16 : 16 + data_len]), raw[
            16 + data_len :
        ]
    assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
    _, flags, kind, cookie, length = struct.unpack_from(">IHHQI", raw)
    payload = raw[20 : 20 + length]
    assert len(payload) == length
    return Decoded("chunk", cookie, flags=flags, type=kind, payload=payload), raw[20 + length :]


u64 = st.integers(0, 2**64 - 1)


@given(cookie=u64, error=st.sampled_from(list(Err)))
def test_simple_reply_round_trip(cookie: int, error: Err) -> None:
    reply, rest = decode_reply(simple_reply(cookie, error))
    assert (reply.kind, reply.cookie, reply.error, rest) == ("simple", cookie, error, b"")


def test_simple_reply_without_an_error_is_a_success() -> None:
    reply, _ = decode_reply(simple_reply(7))
    assert (reply.kind, reply.cookie, reply.error) == ("simple", 7, 0)


@given(cookie=u64, offset=u64, data=st.binary(max_size=64), done=st.booleans())
def test_data_chunk_round_trip(cookie: int, offset: int, data: bytes, done: bool) -> None:
    reply, rest = decode_reply(data_chunk_header(cookie, offset, len(data), done) + data)
    assert (reply.cookie, reply.type, reply.flags, rest) == (cookie, Chunk.OFFSET_DATA, done, b"")
    assert struct.unpack(">Q", reply.payload[:8])[0] == offset and reply.payload[8:] == data


@given(cookie=u64, offset=u64, length=st.integers(0, 2**32 - 1), done=st.booleans())
def test_hole_chunk_round_trip(cookie: int, offset: int, length: int, done: bool) -> None:
    reply, _ = decode_reply(hole_chunk(cookie, offset, length, done))
    assert (reply.type, reply.flags) == (Chunk.OFFSET_HOLE, done)
    assert struct.unpack(">QI", reply.payload) == (offset, length)


@given(cookie=u64, error=st.sampled_from(list(Err)[1:]), message=st.text(max_size=50),
       offset=st.one_of(st.none(), u64))  # fmt: skip
def test_error_chunk_round_trip(cookie: int, error: Err, message: str, offset: int | None) -> None:
    reply, _ = decode_reply(error_chunk(cookie, error, message, offset))
    assert reply.flags == 1, "an error chunk ends the reply"
    assert reply.type == (Chunk.ERROR if offset is None else Chunk.ERROR_OFFSET)
    assert reply.type & (1 << 15), "error chunk types have bit 15 set"
    err, mlen = struct.unpack_from(">IH", reply.payload)
    assert err == error and reply.payload[6 : 6 + mlen].decode() == message
    tail = reply.payload[6 + mlen :]
    assert tail == (b"" if offset is None else struct.pack(">Q", offset))


@pytest.mark.parametrize(
    "message",
    ["x" + "\u00e9" * 3000, "\u20ac" * 2000, "bad name \udcff from the OS"],
    ids=["odd-cut", "three-byte", "surrogate"],
)
def test_error_chunk_message_is_a_whole_utf8_string(message: str) -> None:
    reply, _ = decode_reply(error_chunk(7, Err.EIO, message))
    err, mlen = struct.unpack_from(">IH", reply.payload)
    assert err == Err.EIO and mlen <= 4096 and len(reply.payload) == 6 + mlen
    text = reply.payload[6:].decode()  # whole characters only
    assert message.startswith(text.replace("?", "\udcff"))


@given(cookie=u64, context=st.integers(0, 2**32 - 1),
       extents=st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(0, 3)), min_size=1,
                        max_size=20))  # fmt: skip
def test_block_status_chunk_round_trip(
    cookie: int, context: int, extents: list[tuple[int, int]]
) -> None:
    reply, _ = decode_reply(block_status_chunk(cookie, context, extents))
    assert (reply.type, reply.flags) == (Chunk.BLOCK_STATUS, 1)
    assert struct.unpack_from(">I", reply.payload)[0] == context
    body = reply.payload[4:]
    assert [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)] == extents


@given(cookie=u64)
def test_none_chunk_round_trip(cookie: int) -> None:
    reply, _ = decode_reply(none_chunk(cookie))
    assert (reply.type, reply.flags, reply.payload) == (Chunk.NONE, 1, b"")


def test_chunk_not_done() -> None:
    reply, _ = decode_reply(chunk(5, Chunk.OFFSET_HOLE, b"x" * 12, done=False))
    assert reply.flags == 0


@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 16)), max_size=24))
def test_cover_refuses_exactly_the_chunks_that_overlap(chunks: list[tuple[int, int]]) -> None:
    """A READ's chunks in any order: `cover` takes those that touch no byte taken before and
    refuses the others, against a set of bytes; its spans stay sorted, apart and joined."""
    spans: list[tuple[int, int]] = []
    taken: set[int] = set()
    for at, n in chunks:
        wanted = set(range(at, at + n))
        assert cover(spans, at, at + n) == (not wanted & taken), (spans, at, n)
        if not wanted & taken:
            taken |= wanted
        assert set().union(*(range(a, b) for a, b in spans)) == taken
        assert all(a < b < c for (a, b), (c, _) in itertools.pairwise(spans))


def test_cover_joins_a_chunk_that_fills_a_gap_with_both_neighbours() -> None:
    # The random chunks above rarely fill a gap exactly: the spans on both sides become one.
    spans = [(0, 4), (8, 12), (20, 24)]
    assert cover(spans, 4, 8)
    assert spans == [(0, 12), (20, 24)]


@given(
    extents=st.lists(st.tuples(st.integers(0, 2**34), st.integers(0, 3)), min_size=1,
                     max_size=10),
    length=st.integers(1, 2**33),
    req_one=st.booleans(),
    limit=st.integers(1, 12),
)  # fmt: skip
def test_clip_extents_properties(
    extents: list[tuple[int, int]], length: int, req_one: bool, limit: int
) -> None:
    out = clip_extents(extents, length, req_one)
    assert sum(n for n, _ in out) <= length
    assert all(0 < n <= 0xFFFFFFFF for n, _ in out)
    if req_one:
        assert len(out) <= 1
    if any(n > 0 for n, _ in extents):
        assert out, "at least one descriptor when the backend described anything"
    # A reply of at most `limit` descriptors: the first ones of the whole answer, unchanged.
    assert clip_extents(extents, length, req_one, limit=limit) == out[:limit]


@given(
    extents=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1,
                     max_size=12),
    shift=st.integers(0, 8),
    length=st.integers(1, 4000),
    req_one=st.booleans(),
)  # fmt: skip
def test_clip_extents_keeps_to_the_minimum_block_size(
    extents: list[tuple[int, int]], shift: int, length: int, req_one: bool
) -> None:
    """The spec: descriptor lengths MUST be multiples of an advertised minimum block size.
    Pieces a backend gives finer than that are joined into whole blocks, each block with the
    flags every byte of it has (a hole or zeros only if all of it is); only the last
    descriptor may be short (the request or the backend ended inside a block). Flags
    base:allocation does not define are reserved: they go out as 0 (SHOULD)."""
    align = 1 << shift
    out = clip_extents(extents, length, req_one, align)
    assert all(n % align == 0 for n, _ in out[:-1]), out
    described = [f for n, f in extents for _ in range(n)]  # the backend's flags, per byte
    answered = [f for n, f in out for _ in range(n)]
    if req_one:
        assert len(out) <= 1
    else:
        assert len(answered) == min(length, len(described))
    for start in range(0, len(answered), align):
        block = described[start : start + align]
        shared = functools.reduce(operator.and_, block) & 3  # other bits are reserved
        assert set(answered[start : start + align]) == {shared}, (start, out)


QEMU_CONTEXTS = ("qemu:allocation-depth", "qemu:dirty-bitmap:backup")


def test_clip_extents_without_an_alignment_keeps_the_backends_lengths() -> None:
    # No minimum block size: descriptors as fine as the backend gave them, only merged and cut.
    extents = [(3, 0), (5, 3), (1, 3), (7, 1)]
    assert clip_extents(extents, 14, False) == [(3, 0), (6, 3), (5, 1)]


def test_clip_extents_merges_equal_neighbours_while_the_length_fits_in_32_bits() -> None:
    big = 0xFFFFFFFF  # descriptor lengths are u32
    assert clip_extents([(big - 1, 1), (1, 1)], 2**34, False) == [(big, 1)]
    assert clip_extents([(5, 0), (big, 1), (1, 1)], 2**34, False) == [(5, 0), (big, 1), (1, 1)]


def test_clip_extents_an_empty_piece_inside_a_block_describes_nothing() -> None:
    # A backend's zero-length extent has no bytes: it cannot spoil the flags of its block
    # (while 1-byte pieces are bytes like any other).
    assert clip_extents([(2, 3), (0, 0), (1, 3), (1, 3)], 4, False, align=4) == [(4, 3)]
    # The smallest alignment there is, too: a block of 2 bytes with data is data.
    assert clip_extents([(3, 0), (3, 3)], 6, False, align=2) == [(4, 0), (2, 3)]


def test_context_merge_joins_pieces_of_a_block_as_each_context_means() -> None:
    """A dirty bitmap's block is dirty if any piece is; an allocation depth is the nearest
    layer any piece comes from, 0 only if none is allocated; base:allocation's flags are
    joined by clip_extents itself (None)."""
    assert context_merge(BASE_ALLOCATION) is None
    dirty, depth = context_merge(QEMU_CONTEXTS[1]), context_merge(QEMU_CONTEXTS[0])
    assert dirty is not None and depth is not None
    assert (dirty(0, 1), dirty(1, 0), dirty(0, 0)) == (1, 1, 0)
    assert (depth(2, 3), depth(3, 2), depth(0, 3), depth(3, 0), depth(0, 0)) == (2, 2, 3, 3, 0)


@pytest.mark.parametrize(
    ("option", "queries", "expected"),
    [
        # LIST: no query lists all; a namespace (ending in ':') lists what is under it.
        (Opt.LIST_META_CONTEXT, [], [(0, BASE_ALLOCATION), (0, QEMU_CONTEXTS[0]),
                                     (0, QEMU_CONTEXTS[1])]),
        (Opt.LIST_META_CONTEXT, ["qemu:"], [(0, QEMU_CONTEXTS[0]), (0, QEMU_CONTEXTS[1])]),
        (Opt.LIST_META_CONTEXT, ["qemu:dirty-bitmap:"], [(0, QEMU_CONTEXTS[1])]),
        (Opt.LIST_META_CONTEXT, ["qemu:dirty-bitmap:other"], []),
        # SET: whole names only, each with its id; a namespace selects nothing.
        (Opt.SET_META_CONTEXT, ["qemu:"], []),
        (Opt.SET_META_CONTEXT, [QEMU_CONTEXTS[1], BASE_ALLOCATION],
         [(3, QEMU_CONTEXTS[1]), (1, BASE_ALLOCATION)]),
    ],
)  # fmt: skip
def test_handshake_meta_contexts_an_export_offers_beyond_base_allocation(
    option: Opt, queries: list[str], expected: list[tuple[int, str]]
) -> None:
    """An export with qemu: contexts (a cow node's qemu:allocation-depth and dirty bitmap):
    LIST and SET as the spec words them, ids for SET in the export's order after
    base:allocation's, and GO carries the selection."""
    from dataclasses import replace

    offering = replace(EXPORT, contexts=QEMU_CONTEXTS)
    c = Client(HandshakePolicy(lookup=lambda name: offering, listing=lambda: [offering]))
    c.send(opt(Opt.STRUCTURED_REPLY))
    _, replies = c.send(opt(option, meta_data("disk", queries)))
    got = [(struct.unpack(">I", r.data[:4])[0], r.data[4:].decode())
           for r in replies if r.rep == Rep.META_CONTEXT]  # fmt: skip
    assert got == expected and replies[-1].rep == Rep.ACK
    event, _ = c.send(opt(Opt.GO, info_data("disk")))
    assert isinstance(event, Ready)
    assert event.meta_contexts == (tuple(i for i, _ in expected) if option == Opt.SET_META_CONTEXT
                                   else ())  # fmt: skip


def _valid_block_sizes(lo: int, pref: int, hi: int) -> bool:
    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return (
        power_of_two(lo)
        and lo <= 64 * 1024
        and power_of_two(pref)
        and max(lo, 512) <= pref <= 32 * 1024 * 1024
        and pref <= hi <= 0xFFFFFFFF
        and (hi == 0xFFFFFFFF or hi % lo == 0)
    )


@given(lo=st.integers(0, 2**32 - 1), pref=st.integers(0, 2**32 - 1), hi=st.integers(0, 2**32 - 1))
def test_block_sizes_are_always_what_the_spec_allows(lo: int, pref: int, hi: int) -> None:
    """Whatever a backend asks for, INFO_BLOCK_SIZE carries valid constraints; what it asks
    that is valid already is kept as it is, and a stated maximum is never raised above what
    the backend takes unless it is below the 512 bytes every preferred size needs."""
    got = block_sizes(lo, pref, hi)
    assert _valid_block_sizes(*got), got
    if _valid_block_sizes(lo, pref, hi):
        assert got == (lo, pref, hi)
    if hi and got[2] != 0xFFFFFFFF:
        assert got[2] <= max(hi, got[0], 512)


@pytest.mark.parametrize(
    ("asked", "advertised"),
    [
        ((0, 0, 0), (1, 4096, 0xFFFFFFFF)),
        ((65536, 0, 0), (65536, 65536, 0xFFFFFFFF)),  # the 4096 default is below the minimum
        ((512, 0, 1024), (512, 1024, 1024)),  # ... and above the maximum
        ((3, 1000, 5001), (4, 1024, 5000)),
        ((1, 0, 256), (1, 512, 512)),
    ],
)
def test_block_sizes_move_as_little_as_they_can(
    asked: tuple[int, int, int], advertised: tuple[int, int, int]
) -> None:
    assert block_sizes(*asked) == advertised
