"""Container health check: exit 0 when the node in this container answers.

With NBDFABRIC_CONTROL set, `nbdfabric health ADDR` (grpc.health.v1) decides; otherwise the
node must send the NBD greeting on NBDFABRIC_HEALTH (HOST:PORT or unix:PATH).
"""

import os
import socket
import subprocess
import sys

TIMEOUT = 2.0


def nbd_greeting(addr: str) -> bool:
    if addr.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX)
        target: object = addr[5:]
    else:
        host, _, port = addr.rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        target = (host.strip("[]"), int(port))
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(target)
        data = b""
        while len(data) < 8:
            chunk = sock.recv(8 - len(data))
            if not chunk:
                break
            data += chunk
        return data == b"NBDMAGIC"
    except OSError:
        return False
    finally:
        sock.close()


def main() -> int:
    control = os.environ.get("NBDFABRIC_CONTROL")
    if control:
        res = subprocess.run(["nbdfabric", "health", control], timeout=TIMEOUT + 1, check=False)
        return 0 if res.returncode == 0 else 1
    return 0 if nbd_greeting(os.environ.get("NBDFABRIC_HEALTH", "127.0.0.1:10809")) else 1


if __name__ == "__main__":
    sys.exit(main())
