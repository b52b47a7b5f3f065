from nodes.control.rpc.nbdfabric.v1 import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopNodesRequest(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class StopNodesResponse(_message.Message):
    __slots__ = ("stopped",)
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    stopped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stopped: _Optional[_Iterable[str]] = ...) -> None: ...

class StartNodesRequest(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class StartNodesResponse(_message.Message):
    __slots__ = ("started",)
    STARTED_FIELD_NUMBER: _ClassVar[int]
    started: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, started: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class RestartNodesRequest(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class RestartNodesResponse(_message.Message):
    __slots__ = ("restarted",)
    RESTARTED_FIELD_NUMBER: _ClassVar[int]
    restarted: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, restarted: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("topology_yaml", "source", "dry_run", "base_dir")
    TOPOLOGY_YAML_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    BASE_DIR_FIELD_NUMBER: _ClassVar[int]
    topology_yaml: str
    source: str
    dry_run: bool
    base_dir: str
    def __init__(self, topology_yaml: _Optional[str] = ..., source: _Optional[str] = ..., dry_run: bool = ..., base_dir: _Optional[str] = ...) -> None: ...

class PlannedAction(_message.Message):
    __slots__ = ("node", "action", "reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    action: str
    reason: str
    def __init__(self, node: _Optional[str] = ..., action: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("actions", "exports")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedCompositeFieldContainer[PlannedAction]
    exports: _containers.RepeatedCompositeFieldContainer[FabricExport]
    def __init__(self, actions: _Optional[_Iterable[_Union[PlannedAction, _Mapping]]] = ..., exports: _Optional[_Iterable[_Union[FabricExport, _Mapping]]] = ...) -> None: ...

class FabricExport(_message.Message):
    __slots__ = ("name", "node", "uris", "exports")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    URIS_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    node: str
    uris: _containers.RepeatedScalarFieldContainer[str]
    exports: str
    def __init__(self, name: _Optional[str] = ..., node: _Optional[str] = ..., uris: _Optional[_Iterable[str]] = ..., exports: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "kind", "role", "state", "health", "pid", "restarts", "uptime_seconds", "uri", "control", "upstreams", "export_name", "log_path", "last_error", "export_uris", "container_id", "members", "exports", "rebuild")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    EXPORT_NAME_FIELD_NUMBER: _ClassVar[int]
    LOG_PATH_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    EXPORT_URIS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    REBUILD_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    role: str
    state: str
    health: str
    pid: int
    restarts: int
    uptime_seconds: float
    uri: str
    control: str
    upstreams: _containers.RepeatedScalarFieldContainer[str]
    export_name: str
    log_path: str
    last_error: str
    export_uris: _containers.RepeatedScalarFieldContainer[str]
    container_id: str
    members: _containers.RepeatedCompositeFieldContainer[_node_pb2.Member]
    exports: str
    rebuild: _node_pb2.RebuildProgress
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., health: _Optional[str] = ..., pid: _Optional[int] = ..., restarts: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., uri: _Optional[str] = ..., control: _Optional[str] = ..., upstreams: _Optional[_Iterable[str]] = ..., export_name: _Optional[str] = ..., log_path: _Optional[str] = ..., last_error: _Optional[str] = ..., export_uris: _Optional[_Iterable[str]] = ..., container_id: _Optional[str] = ..., members: _Optional[_Iterable[_Union[_node_pb2.Member, _Mapping]]] = ..., exports: _Optional[str] = ..., rebuild: _Optional[_Union[_node_pb2.RebuildProgress, _Mapping]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("fabric", "nodes", "exports", "supervisor_pid", "run_dir", "source", "backend")
    FABRIC_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    SUPERVISOR_PID_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    fabric: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    exports: _containers.RepeatedCompositeFieldContainer[FabricExport]
    supervisor_pid: int
    run_dir: str
    source: str
    backend: str
    def __init__(self, fabric: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., exports: _Optional[_Iterable[_Union[FabricExport, _Mapping]]] = ..., supervisor_pid: _Optional[int] = ..., run_dir: _Optional[str] = ..., source: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class WatchFabricEventsRequest(_message.Message):
    __slots__ = ("replay", "follow")
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    replay: bool
    follow: bool
    def __init__(self, replay: bool = ..., follow: bool = ...) -> None: ...

class WatchFabricEventsResponse(_message.Message):
    __slots__ = ("time", "node", "kind", "message")
    TIME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    time: float
    node: str
    kind: str
    message: str
    def __init__(self, time: _Optional[float] = ..., node: _Optional[str] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ConfigureNodeRequest(_message.Message):
    __slots__ = ("node", "changes")
    class ChangesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    node: str
    changes: _containers.ScalarMap[str, str]
    def __init__(self, node: _Optional[str] = ..., changes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ConfigureNodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DownResponse(_message.Message):
    __slots__ = ("stopped",)
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    stopped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stopped: _Optional[_Iterable[str]] = ...) -> None: ...
