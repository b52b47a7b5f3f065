"""The NBD protocol, sans I/O: constants, the handshake state machine, the transmission rules.

Standard library only: nothing here awaits, opens a socket or imports libnbd.
"""

from .constants import Cmd, CmdFlag, Err, Extent, TFlag
from .errors import ProtocolError, from_wire, to_wire
from .handshake import ExportInfo, HandshakePolicy, ServerHandshake
from .transmission import Request, Transmission, parse_request, validate

__all__ = [
    "Cmd",
    "CmdFlag",
    "Err",
    "ExportInfo",
    "Extent",
    "HandshakePolicy",
    "ProtocolError",
    "Request",
    "ServerHandshake",
    "TFlag",
    "Transmission",
    "from_wire",
    "parse_request",
    "to_wire",
    "validate",
]
