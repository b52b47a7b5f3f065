from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_STARTING: _ClassVar[NodeState]
    NODE_STATE_SERVING: _ClassVar[NodeState]
    NODE_STATE_PAUSED: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
    NODE_STATE_STOPPED: _ClassVar[NodeState]

class NodeRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_ROLE_UNSPECIFIED: _ClassVar[NodeRole]
    NODE_ROLE_PLUGIN: _ClassVar[NodeRole]
    NODE_ROLE_FILTER: _ClassVar[NodeRole]
    NODE_ROLE_FAN: _ClassVar[NodeRole]

class SupportLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUPPORT_LEVEL_UNSPECIFIED: _ClassVar[SupportLevel]
    SUPPORT_LEVEL_NONE: _ClassVar[SupportLevel]
    SUPPORT_LEVEL_EMULATE: _ClassVar[SupportLevel]
    SUPPORT_LEVEL_NATIVE: _ClassVar[SupportLevel]

class RebuildAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REBUILD_ACTION_UNSPECIFIED: _ClassVar[RebuildAction]
    REBUILD_ACTION_START: _ClassVar[RebuildAction]
    REBUILD_ACTION_STOP: _ClassVar[RebuildAction]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_STARTING: NodeState
NODE_STATE_SERVING: NodeState
NODE_STATE_PAUSED: NodeState
NODE_STATE_DRAINING: NodeState
NODE_STATE_STOPPED: NodeState
NODE_ROLE_UNSPECIFIED: NodeRole
NODE_ROLE_PLUGIN: NodeRole
NODE_ROLE_FILTER: NodeRole
NODE_ROLE_FAN: NodeRole
SUPPORT_LEVEL_UNSPECIFIED: SupportLevel
SUPPORT_LEVEL_NONE: SupportLevel
SUPPORT_LEVEL_EMULATE: SupportLevel
SUPPORT_LEVEL_NATIVE: SupportLevel
REBUILD_ACTION_UNSPECIFIED: RebuildAction
REBUILD_ACTION_START: RebuildAction
REBUILD_ACTION_STOP: RebuildAction

class Param(_message.Message):
    __slots__ = ("name", "type", "value", "default_value", "required", "live", "help")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    value: str
    default_value: str
    required: bool
    live: bool
    help: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., value: _Optional[str] = ..., default_value: _Optional[str] = ..., required: bool = ..., live: bool = ..., help: _Optional[str] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("writable", "flush", "fua", "trim", "zero", "fast_zero", "cache", "extents", "multi_conn", "rotational")
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    FUA_FIELD_NUMBER: _ClassVar[int]
    TRIM_FIELD_NUMBER: _ClassVar[int]
    ZERO_FIELD_NUMBER: _ClassVar[int]
    FAST_ZERO_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    MULTI_CONN_FIELD_NUMBER: _ClassVar[int]
    ROTATIONAL_FIELD_NUMBER: _ClassVar[int]
    writable: bool
    flush: bool
    fua: SupportLevel
    trim: bool
    zero: SupportLevel
    fast_zero: bool
    cache: SupportLevel
    extents: bool
    multi_conn: bool
    rotational: bool
    def __init__(self, writable: bool = ..., flush: bool = ..., fua: _Optional[_Union[SupportLevel, str]] = ..., trim: bool = ..., zero: _Optional[_Union[SupportLevel, str]] = ..., fast_zero: bool = ..., cache: _Optional[_Union[SupportLevel, str]] = ..., extents: bool = ..., multi_conn: bool = ..., rotational: bool = ...) -> None: ...

class BlockSizes(_message.Message):
    __slots__ = ("minimum", "preferred", "maximum")
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    minimum: int
    preferred: int
    maximum: int
    def __init__(self, minimum: _Optional[int] = ..., preferred: _Optional[int] = ..., maximum: _Optional[int] = ...) -> None: ...

class Upstream(_message.Message):
    __slots__ = ("index", "uri", "state", "healthy", "detail_json")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    index: int
    uri: str
    state: str
    healthy: bool
    detail_json: str
    def __init__(self, index: _Optional[int] = ..., uri: _Optional[str] = ..., state: _Optional[str] = ..., healthy: bool = ..., detail_json: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("kind", "role", "version", "state", "healthy", "params", "export_name", "description", "size", "capabilities", "block_sizes", "uris", "upstreams", "status_json", "read_only", "pid", "uptime_seconds", "event_loop", "polling", "serves_several", "exports")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    EXPORT_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZES_FIELD_NUMBER: _ClassVar[int]
    URIS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOOP_FIELD_NUMBER: _ClassVar[int]
    POLLING_FIELD_NUMBER: _ClassVar[int]
    SERVES_SEVERAL_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    role: NodeRole
    version: str
    state: NodeState
    healthy: bool
    params: _containers.RepeatedCompositeFieldContainer[Param]
    export_name: str
    description: str
    size: int
    capabilities: Capabilities
    block_sizes: BlockSizes
    uris: _containers.RepeatedScalarFieldContainer[str]
    upstreams: _containers.RepeatedCompositeFieldContainer[Upstream]
    status_json: str
    read_only: bool
    pid: int
    uptime_seconds: float
    event_loop: str
    polling: Polling
    serves_several: bool
    exports: _containers.RepeatedCompositeFieldContainer[ListedExport]
    def __init__(self, kind: _Optional[str] = ..., role: _Optional[_Union[NodeRole, str]] = ..., version: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., healthy: bool = ..., params: _Optional[_Iterable[_Union[Param, _Mapping]]] = ..., export_name: _Optional[str] = ..., description: _Optional[str] = ..., size: _Optional[int] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., block_sizes: _Optional[_Union[BlockSizes, _Mapping]] = ..., uris: _Optional[_Iterable[str]] = ..., upstreams: _Optional[_Iterable[_Union[Upstream, _Mapping]]] = ..., status_json: _Optional[str] = ..., read_only: bool = ..., pid: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., event_loop: _Optional[str] = ..., polling: _Optional[_Union[Polling, _Mapping]] = ..., serves_several: bool = ..., exports: _Optional[_Iterable[_Union[ListedExport, _Mapping]]] = ...) -> None: ...

class ListedExport(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class Polling(_message.Message):
    __slots__ = ("max_ns", "ns", "hits", "misses", "sockets")
    MAX_NS_FIELD_NUMBER: _ClassVar[int]
    NS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    SOCKETS_FIELD_NUMBER: _ClassVar[int]
    max_ns: int
    ns: int
    hits: int
    misses: int
    sockets: int
    def __init__(self, max_ns: _Optional[int] = ..., ns: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., sockets: _Optional[int] = ...) -> None: ...

class OpStats(_message.Message):
    __slots__ = ("op", "count", "bytes", "errors", "latency_sum_seconds", "latency_buckets")
    OP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SUM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    op: str
    count: int
    bytes: int
    errors: int
    latency_sum_seconds: float
    latency_buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, op: _Optional[str] = ..., count: _Optional[int] = ..., bytes: _Optional[int] = ..., errors: _Optional[int] = ..., latency_sum_seconds: _Optional[float] = ..., latency_buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("ops", "connections_total", "connections_open", "in_flight", "protocol_errors", "uptime_seconds", "latency_bounds_seconds", "pid")
    OPS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_ERRORS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BOUNDS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[OpStats]
    connections_total: int
    connections_open: int
    in_flight: int
    protocol_errors: int
    uptime_seconds: float
    latency_bounds_seconds: _containers.RepeatedScalarFieldContainer[float]
    pid: int
    def __init__(self, ops: _Optional[_Iterable[_Union[OpStats, _Mapping]]] = ..., connections_total: _Optional[int] = ..., connections_open: _Optional[int] = ..., in_flight: _Optional[int] = ..., protocol_errors: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., latency_bounds_seconds: _Optional[_Iterable[float]] = ..., pid: _Optional[int] = ...) -> None: ...

class ConfigureRequest(_message.Message):
    __slots__ = ("changes",)
    class ChangesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.ScalarMap[str, str]
    def __init__(self, changes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ConfigureResponse(_message.Message):
    __slots__ = ("params",)
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[Param]
    def __init__(self, params: _Optional[_Iterable[_Union[Param, _Mapping]]] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("flush",)
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    flush: bool
    def __init__(self, flush: bool = ...) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlushResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("grace_seconds",)
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    grace_seconds: float
    def __init__(self, grace_seconds: _Optional[float] = ...) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("send_current_state",)
    SEND_CURRENT_STATE_FIELD_NUMBER: _ClassVar[int]
    send_current_state: bool
    def __init__(self, send_current_state: bool = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "message", "time", "detail_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    time: _timestamp_pb2.Timestamp
    detail_json: str
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., detail_json: _Optional[str] = ...) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("index", "uri", "state", "healthy", "detail_json")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    index: int
    uri: str
    state: str
    healthy: bool
    detail_json: str
    def __init__(self, index: _Optional[int] = ..., uri: _Optional[str] = ..., state: _Optional[str] = ..., healthy: bool = ..., detail_json: _Optional[str] = ...) -> None: ...

class RebuildProgress(_message.Message):
    __slots__ = ("running", "member_index", "done_bytes", "total_bytes", "throttle_bytes_per_second", "rate_bytes_per_second", "detail_json")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    MEMBER_INDEX_FIELD_NUMBER: _ClassVar[int]
    DONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RATE_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    running: bool
    member_index: int
    done_bytes: int
    total_bytes: int
    throttle_bytes_per_second: int
    rate_bytes_per_second: float
    detail_json: str
    def __init__(self, running: bool = ..., member_index: _Optional[int] = ..., done_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., throttle_bytes_per_second: _Optional[int] = ..., rate_bytes_per_second: _Optional[float] = ..., detail_json: _Optional[str] = ...) -> None: ...

class ListMembersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMembersResponse(_message.Message):
    __slots__ = ("members", "rebuild")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REBUILD_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    rebuild: RebuildProgress
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., rebuild: _Optional[_Union[RebuildProgress, _Mapping]] = ...) -> None: ...

class ReplaceMemberRequest(_message.Message):
    __slots__ = ("index", "uri")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    index: int
    uri: str
    def __init__(self, index: _Optional[int] = ..., uri: _Optional[str] = ...) -> None: ...

class ReplaceMemberResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class MarkMemberFaultyRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class MarkMemberFaultyResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class TrustMemberRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class TrustMemberResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class SetRebuildRequest(_message.Message):
    __slots__ = ("action", "throttle_bytes_per_second")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    action: RebuildAction
    throttle_bytes_per_second: int
    def __init__(self, action: _Optional[_Union[RebuildAction, str]] = ..., throttle_bytes_per_second: _Optional[int] = ...) -> None: ...

class SetRebuildResponse(_message.Message):
    __slots__ = ("progress",)
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    progress: RebuildProgress
    def __init__(self, progress: _Optional[_Union[RebuildProgress, _Mapping]] = ...) -> None: ...

class WatchRebuildRequest(_message.Message):
    __slots__ = ("interval_seconds",)
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    interval_seconds: float
    def __init__(self, interval_seconds: _Optional[float] = ...) -> None: ...

class WatchRebuildResponse(_message.Message):
    __slots__ = ("progress",)
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    progress: RebuildProgress
    def __init__(self, progress: _Optional[_Union[RebuildProgress, _Mapping]] = ...) -> None: ...
