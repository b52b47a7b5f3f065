"""A private OpenSSH server for the ssh plugin's tests and benchmark: its own host key, config,
client key and known_hosts under a temporary directory, listening on 127.0.0.1 on a free port.

It runs as root (sshd needs it to log anyone in), serves SFTP with internal-sftp and lets in
the one client key. Nothing of the system's sshd is used or changed but /run/sshd, the
privilege separation directory every sshd needs, made if missing. stop() kills the listener
and every process it started (one per connection, which outlive a listener killed alone).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def usable() -> str | None:
    """Why a private sshd cannot run here, or None."""
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is missing: install openssh-server (make setup does)"
    if os.geteuid() != 0:
        return "a private sshd that logs users in must run as root"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is missing (openssh-client)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (by parent pid), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Sshd:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host_key = self.dir / "host_key"
        self.client_key = self.dir / "client_key"
        self.known_hosts = self.dir / "known_hosts"
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        for key in (self.host_key, self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                               check=True)  # fmt: skip
        (self.dir / "authorized_keys").write_bytes(self.client_key.with_suffix(".pub").read_bytes())
        host_pub = " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.dir}/sshd.pid\n"
            f"AuthorizedKeysFile {self.dir}/authorized_keys\n"
            "PermitRootLogin prohibit-password\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "Subsystem sftp internal-sftp\n"
        )
        self.start()

    def args(self) -> list[str]:
        """The ssh node's (and nbdkit's) params that reach this server as root."""
        return [
            "host=127.0.0.1",
            f"port={self.port}",
            "user=root",
            f"identity={self.client_key}",
            f"known-hosts={self.known_hosts}",
        ]

    def start(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not listen: {self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill the listener and each connection's processes (SIGKILL: as a crash)."""
        if self.proc is None:
            return
        # Stop the whole tree first, until no new process appears (a stopped process forks
        # no more, and one killed first would leave its children to init, out of reach).
        stopped: set[int] = set()
        while True:
            tree = {self.proc.pid, *descendants(self.proc.pid)} - stopped
            if not tree:
                break
            for pid in tree:
                _signal(pid, signal.SIGSTOP)
            stopped |= tree
        for pid in stopped:
            _signal(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
