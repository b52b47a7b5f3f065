"""Sans-IO server side of the fixed newstyle handshake: bytes in, replies and events out.

The server feeds whatever it reads to `receive_data`, sends `data_to_send()`, and reacts to the
events `next_event()` returns: `StartTLS` (send the ACK, then upgrade the stream), `Prepare`
(wait until the export, or the list, can be looked up at once, then ask for the next event),
`Ready` (transmission begins) or `Closed` (drop the connection). All option answers are made
here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto

from .constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    MAX_STRING,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    OPTION_HEADER,
    OPTION_REPLY,
    U16,
    U32,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TFlag,
    wire_string,
)

#: The largest minimum block size the spec allows, and the range of the preferred one.
MAX_BLOCK_MIN = 64 * 1024
PREFERRED_RANGE = (512, 32 * 1024 * 1024)
#: A maximum block size that means "no limit of its own" (it need not be a multiple).
UNLIMITED_BLOCK_MAX = 0xFFFFFFFF


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def block_sizes(minimum: int, preferred: int, maximum: int) -> tuple[int, int, int]:
    """The INFO_BLOCK_SIZE a server may send for what a backend asked (each 0: no preference),
    as the spec requires: a minimum that is a power of two up to 64K, a preferred size that is
    a power of two from max(minimum, 512) to 32M, and a maximum that is 4G-1 or a multiple of
    the minimum and at least the preferred size. Valid input comes back unchanged; anything
    else (a backend's or script's mistake) moves as little as it can: the minimum up to a
    power of two, the preferred size into its range and under the maximum, the maximum down to
    a multiple of the minimum but never below max(minimum, 512)."""
    lo = min(_power_of_two_at_least(minimum or 1), MAX_BLOCK_MIN)
    hi = maximum or UNLIMITED_BLOCK_MAX
    if hi != UNLIMITED_BLOCK_MAX:
        hi = max(hi - hi % lo, lo, PREFERRED_RANGE[0])
    pref = _power_of_two_at_least(max(preferred or 4096, lo, PREFERRED_RANGE[0]))
    pref = min(pref, PREFERRED_RANGE[1], _power_of_two_at_most(hi))
    return lo, pref, hi


@dataclass(frozen=True)
class ExportInfo:
    """What a client learns about an export during the handshake."""

    name: str
    size: int
    tflags: TFlag  #: without SEND_DF, which depends on structured replies being negotiated
    description: str = ""
    block_min: int = 0  #: 0: advertise no block size constraints
    block_preferred: int = 0
    block_max: int = 0
    #: The server's own reference for this export (what serves it); the handshake passes it
    #: on in `Ready` and never looks at it.
    handle: object = field(default=None, compare=False, repr=False)
    #: Meta contexts it offers besides base:allocation (`qemu:allocation-depth`,
    #: `qemu:dirty-bitmap:NAME`), in order: the n-th has id BASE_ALLOCATION_ID + 1 + n.
    contexts: tuple[str, ...] = ()

    def offered_contexts(self) -> dict[str, int]:
        """Every meta context of the export, by name, with the id SET_META_CONTEXT gives it."""
        offered = {BASE_ALLOCATION: BASE_ALLOCATION_ID}
        for n, name in enumerate(self.contexts):
            offered.setdefault(name, BASE_ALLOCATION_ID + 1 + n)
        return offered

    def flags_for(self, structured: bool) -> TFlag:
        flags = self.tflags | TFlag.HAS_FLAGS
        if not structured:
            flags &= ~TFlag.SEND_DF
        return flags


@dataclass(frozen=True)
class HandshakePolicy:
    tls: str = "off"  #: off | on | require
    structured_replies: bool = True  #: False behaves like nbdkit --no-sr
    no_zeroes: bool = True
    #: The export a name leads to (None: unknown). `listing` is what NBD_OPT_LIST shows;
    #: it raises ListRefused to answer NBD_REP_ERR_POLICY instead.
    lookup: Callable[[str], ExportInfo | None] = field(default=lambda name: None)
    listing: Callable[[], Sequence[ExportInfo]] = field(default=lambda: ())
    #: Announce each lookup and listing with a `Prepare` event first (exports that are opened
    #: or listed by waiting on something: exportname's upstream).
    prepare: bool = False


class ListRefused(Exception):
    """The server will not list its exports (policy): NBD_OPT_LIST gets NBD_REP_ERR_POLICY."""


# Events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartTLS:
    """The ACK is queued: send it, then run the TLS handshake on the stream (`leftover` is the
    first of what it reads) and call tls_started."""

    #: What the client sent after STARTTLS, before TLS: it belongs to the TLS layer (a
    #: ClientHello sent without waiting for the ACK), never to this handshake, which would
    #: take plaintext injected there as if it had come over TLS.
    leftover: bytes = b""


@dataclass(frozen=True)
class Prepare:
    """Before the option that is being answered looks up export `name` (None: lists the
    exports): the server gets ready for that, then calls next_event() again."""

    name: str | None


@dataclass(frozen=True)
class Ready:
    """Transmission begins on `export`; `leftover` is what the client sent after the last option."""

    export: ExportInfo
    structured: bool
    meta_contexts: tuple[int, ...]  #: selected context ids (ExportInfo.offered_contexts)
    leftover: bytes


@dataclass(frozen=True)
class Closed:
    reason: str
    soft: bool = False  #: True for NBD_OPT_ABORT


class NeedData(Enum):
    NEED_DATA = auto()


NEED_DATA = NeedData.NEED_DATA
Event = StartTLS | Prepare | Ready | Closed | NeedData


class _State(Enum):
    CLIENT_FLAGS = auto()
    OPTION_HEADER = auto()
    OPTION_DATA = auto()
    DONE = auto()


class _Malformed(Exception):
    """Option data that does not parse: answered with ERR_INVALID."""


class _Unprepared(Exception):
    """The option needs a lookup the server has not prepared yet (see Prepare)."""

    def __init__(self, name: str | None) -> None:
        self.name = name


class ServerHandshake:
    """One connection's handshake, from the greeting to transmission (or a close)."""

    def __init__(self, policy: HandshakePolicy) -> None:
        self.policy = policy
        self._buf = bytearray()
        self._out = bytearray()
        self._state = _State.CLIENT_FLAGS
        self._options_seen = 0
        #: Options allowed before the client must pick an export (see _list for the raise).
        self._option_budget = MAX_OPTIONS
        self._listed = False
        self._option = 0
        self._option_len = 0
        self.client_flags = ClientFlag(0)
        self.tls_active = False
        self.shutting_down = False
        self.structured = False
        self._meta_export: str | None = None
        self._meta_ids: tuple[int, ...] = ()
        #: The option waiting for its Prepare to be done, and what was prepared for it.
        self._held: tuple[int, bytes] | None = None
        self._prepared: tuple[str | None] | None = None
        flags = HandshakeFlag.FIXED_NEWSTYLE
        if policy.no_zeroes:
            flags |= HandshakeFlag.NO_ZEROES
        self._server_flags = flags
        self._out += GREETING.pack(NBDMAGIC, IHAVEOPT, flags)

    # I/O facade ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The stream is now TLS: earlier negotiation is forgotten (spec, STARTTLS)."""
        self.tls_active = True
        self.structured = False
        self._meta_export = None
        self._meta_ids = ()

    def next_event(self) -> Event:
        if self._held is not None:  # its Prepare is done: answer it now
            (option, data), self._held = self._held, None
            event = self._answer(option, data)
            if self._held is None:
                self._prepared = None  # each option's lookup is prepared anew
            if event is not None:
                return event
        while True:
            if self._state is _State.DONE:
                return Closed("handshake already finished")
            if self._state is _State.CLIENT_FLAGS:
                if len(self._buf) < CLIENT_FLAGS.size:
                    return NEED_DATA
                (raw,) = CLIENT_FLAGS.unpack_from(self._buf)
                del self._buf[: CLIENT_FLAGS.size]
                if raw & ~int(self._server_flags):
                    return self._close(f"client flags {raw:#x} not offered by the server")
                self.client_flags = ClientFlag(raw)
                self._state = _State.OPTION_HEADER
                continue
            if self._state is _State.OPTION_HEADER:
                if len(self._buf) < OPTION_HEADER.size:
                    return NEED_DATA
                magic, option, length = OPTION_HEADER.unpack_from(self._buf)
                del self._buf[: OPTION_HEADER.size]
                if magic != IHAVEOPT:
                    return self._close(f"bad option magic {magic:#x}")
                self._options_seen += 1
                if self._options_seen > self._option_budget:
                    return self._close(f"more than {self._option_budget} options")
                if length > MAX_OPTION_LENGTH:
                    return self._close(f"option data of {length} bytes is too long")
                self._option, self._option_len = option, length
                self._state = _State.OPTION_DATA
                continue
            if len(self._buf) < self._option_len:
                return NEED_DATA
            data = bytes(self._buf[: self._option_len])
            del self._buf[: self._option_len]
            self._state = _State.OPTION_HEADER
            event = self._answer(self._option, data)
            if event is not None:
                return event

    # Options ---------------------------------------------------------------------------------

    def _answer(self, option: int, data: bytes) -> Event | None:
        """Answer one option, or hold it back behind a Prepare event."""
        try:
            return self._handle_option(option, data)
        except _Unprepared as wait:
            self._held, self._prepared = (option, data), (wait.name,)
            return Prepare(wait.name)

    def _close(self, reason: str, soft: bool = False) -> Closed:
        self._state = _State.DONE
        return Closed(reason, soft)

    def _reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, rep, len(data))
        self._out += data

    def _error(self, option: int, rep: Rep, message: str) -> None:
        self._reply(option, rep, wire_string(message))

    def _lookup(self, name: str) -> ExportInfo | None:
        self._await_prepared(name)
        return self.policy.lookup(name)

    def _await_prepared(self, name: str | None) -> None:
        """With `policy.prepare`, the first time an option looks `name` up: stop, so that the
        server prepares it (the option is answered at the next next_event())."""
        if self.policy.prepare and self._prepared != (name,):
            raise _Unprepared(name)

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        fixed = bool(self.client_flags & ClientFlag.FIXED_NEWSTYLE)
        if option == Opt.EXPORT_NAME:
            return self._export_name(data)
        if not fixed:
            # Old non-fixed clients know only EXPORT_NAME; nbdkit answers the rest like this.
            self._error(option, Rep.ERR_INVALID, "fixed newstyle was not negotiated")
            return None
        if option == Opt.ABORT:
            self._reply(option, Rep.ACK)
            return self._close("client aborted", soft=True)
        if self.shutting_down:
            self._error(option, Rep.ERR_SHUTDOWN, "server is shutting down")
            return None
        if option == Opt.STARTTLS:
            return self._starttls(data)
        if self.policy.tls == "require" and not self.tls_active:
            self._error(option, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
            return None
        try:
            if option == Opt.LIST:
                self._list(data)
            elif option in (Opt.INFO, Opt.GO):
                return self._info_or_go(option, data)
            elif option == Opt.STRUCTURED_REPLY:
                self._structured_reply(data)
            elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                self._meta_context(option, data)
            else:
                self._error(option, Rep.ERR_UNSUP, f"option {option} is not supported")
        except _Malformed as exc:
            self._error(option, Rep.ERR_INVALID, str(exc))
        return None

    def _export_name(self, data: bytes) -> Event:
        # EXPORT_NAME has no error path: any failure is a hard disconnect (spec).
        if self.shutting_down:
            return self._close("server is shutting down")
        if self.policy.tls == "require" and not self.tls_active:
            return self._close("EXPORT_NAME before TLS on a TLS-only server")
        try:
            name = _decode(data)
        except _Malformed as exc:
            return self._close(str(exc))
        export = self._lookup(name)
        if export is None:
            return self._close(f"unknown export {name!r}")
        self._out += EXPORT_NAME_REPLY.pack(export.size, export.flags_for(self.structured))
        if not self.client_flags & ClientFlag.NO_ZEROES:
            self._out += bytes(124)
        return self._ready(export, name)

    def _ready(self, export: ExportInfo, name: str) -> Ready:
        meta = self._meta_ids if self._meta_export == name else ()
        leftover = bytes(self._buf)
        self._buf.clear()
        self._state = _State.DONE
        return Ready(export, self.structured, meta, leftover)

    def _starttls(self, data: bytes) -> Event | None:
        if data:
            self._error(Opt.STARTTLS, Rep.ERR_INVALID, "STARTTLS takes no data")
        elif self.policy.tls == "off":
            self._error(Opt.STARTTLS, Rep.ERR_UNSUP, "TLS is not enabled on this server")
        elif self.tls_active:
            self._error(Opt.STARTTLS, Rep.ERR_INVALID, "TLS is already active")
        else:
            self._reply(Opt.STARTTLS, Rep.ACK)
            leftover = bytes(self._buf)
            self._buf.clear()
            return StartTLS(leftover)
        return None

    def _list(self, data: bytes) -> None:
        if data:
            raise _Malformed("LIST takes no data")
        self._await_prepared(None)
        try:
            listing = self.policy.listing()
        except ListRefused as exc:
            self._error(Opt.LIST, Rep.ERR_POLICY, str(exc) or "listing exports is not allowed")
            return
        if not self._listed:
            # A client that lists the exports may then ask about each one (nbdinfo --list
            # sends LIST_META_CONTEXT and INFO per export): the budget grows once, by two
            # options per export listed. nbdkit lifts its cap after a LIST; we keep a bound.
            self._listed = True
            self._option_budget += 2 * len(listing)
        for export in listing:
            name = export.name.encode()
            payload = U32.pack(len(name)) + name + wire_string(export.description)
            self._reply(Opt.LIST, Rep.SERVER, payload)
        self._reply(Opt.LIST, Rep.ACK)

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        reader = _Reader(data)
        name = reader.string(reader.u32())
        requests = [reader.u16() for _ in range(reader.u16())]
        reader.end()
        export = self._lookup(name)
        if export is None:
            self._error(option, Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return None
        self._reply(
            option,
            Rep.INFO,
            INFO_EXPORT.pack(Info.EXPORT, export.size, export.flags_for(self.structured)),
        )
        if Info.NAME in requests:
            self._reply(option, Rep.INFO, U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in requests and export.description:
            desc = wire_string(export.description)
            self._reply(option, Rep.INFO, U16.pack(Info.DESCRIPTION) + desc)
        if export.block_min:
            # Sent even when not asked for: the spec allows it and clients must obey it if asked.
            sizes = (export.block_min, export.block_preferred, export.block_max)
            self._reply(option, Rep.INFO, INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, *sizes))
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            return self._ready(export, name)
        return None

    def _structured_reply(self, data: bytes) -> None:
        if data:
            raise _Malformed("STRUCTURED_REPLY takes no data")
        if not self.policy.structured_replies:
            self._error(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, "structured replies are disabled")
        elif self.structured:
            raise _Malformed("structured replies are already negotiated")
        else:
            self.structured = True
            self._reply(Opt.STRUCTURED_REPLY, Rep.ACK)

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == Opt.SET_META_CONTEXT
        if setting:
            # The selection is replaced even when the option fails (spec).
            self._meta_export, self._meta_ids = None, ()
        reader = _Reader(data)
        name = reader.string(reader.u32())
        queries = [reader.string(reader.u32()) for _ in range(reader.u32())]
        reader.end()
        if not self.structured:
            raise _Malformed("meta contexts need structured replies first")
        export = self._lookup(name)
        if export is None:
            self._error(option, Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return
        offered = export.offered_contexts()
        matched: dict[str, int] = {}
        # LIST with no query lists them all; a query ending in ':' (`base:`, `qemu:`,
        # `qemu:dirty-bitmap:`) lists those under it. SET takes whole names only (spec).
        for query in queries or ([] if setting else [""]):
            for context, context_id in offered.items():
                wildcard = not setting and (query == "" or query.endswith(":"))
                if context == query or (wildcard and context.startswith(query)):
                    matched[context] = context_id
        for context, context_id in matched.items():
            reply = U32.pack(context_id if setting else 0) + context.encode()
            self._reply(option, Rep.META_CONTEXT, reply)
        if setting:
            self._meta_export = name
            self._meta_ids = tuple(matched.values())
        self._reply(option, Rep.ACK)


def _decode(raw: bytes) -> str:
    if len(raw) > MAX_STRING:
        raise _Malformed(f"string of {len(raw)} bytes is longer than {MAX_STRING}")
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise _Malformed("string is not UTF-8") from exc
    if "\0" in text:
        raise _Malformed("string contains NUL")
    return text


class _Reader:
    """Reads length-checked fields out of one option's data."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise _Malformed("option data is shorter than its fields say")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return int(U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(U32.unpack(self._take(4))[0])

    def string(self, n: int) -> str:
        return _decode(self._take(n))

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _Malformed("option data is longer than its fields say")
