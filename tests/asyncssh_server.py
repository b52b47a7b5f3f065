"""An SSH server that logs in one user with a password and serves SFTP (asyncssh's own server
and SFTP server), for the ssh plugin's password tests: the private OpenSSH server
(ssh_server.py) takes no passwords, as it could only check those of the machine's users.

Run as `python asyncssh_server.py PORT HOST_KEY USER PASSWORD`; it prints `ready` once it
listens, and serves until killed.
"""

from __future__ import annotations

import asyncio
import sys

import asyncssh


async def main(port: int, host_key: str, user: str, password: str) -> None:
    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, given: str) -> bool:
            return (username, given) == (user, password)

    await asyncssh.listen(
        "127.0.0.1", port, server_host_keys=[host_key], server_factory=Server, sftp_factory=True
    )
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
