"""TLS for nodes, with nbdkit's `--tls-certificates DIR` layout (ca-cert.pem, server-cert.pem,
server-key.pem) and optional client certificate checks (`--tls-verify-peer`).
"""

from __future__ import annotations

import os
import ssl
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import NodeOptions


class TLSConfigError(ValueError):
    pass


def server_context(options: NodeOptions) -> ssl.SSLContext:
    if options.tls_psk:
        if not hasattr(ssl.SSLContext, "set_psk_server_callback"):
            raise TLSConfigError(
                f"--tls-psk needs Python 3.13 or later (this is {sys.version.split()[0]}); "
                "use --tls-certificates"
            )
        raise TLSConfigError("--tls-psk is not implemented yet; use --tls-certificates")
    directory = options.tls_certificates
    if not directory:
        raise TLSConfigError("--tls=on/require needs --tls-certificates DIR")
    cert = os.path.join(directory, "server-cert.pem")
    key = os.path.join(directory, "server-key.pem")
    ca = os.path.join(directory, "ca-cert.pem")
    for path in (cert, key):
        if not os.path.exists(path):
            raise TLSConfigError(f"TLS: {path} is missing (nbdkit's --tls-certificates layout)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # spec: TLS 1.2 or later
    context.load_cert_chain(cert, key)
    if options.tls_verify_peer:
        if not os.path.exists(ca):
            raise TLSConfigError(f"TLS: --tls-verify-peer needs {ca}")
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
