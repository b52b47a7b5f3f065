"""ssh: a file on a remote host, read and written over SFTP (nbdkit-ssh-plugin).

The node logs in to `host` over SSH (asyncssh), starts the SFTP subsystem and opens `path`
(relative to the remote user's home directory when relative) for reading and writing, or for
reading only with `--read-only`. Each NBD read or write is an SFTP read or write at its offset
on that one open file; many are in flight at once, from every client, and asyncssh splits long
ones into the server's largest SFTP requests, several in flight. The size is the file's, from
a stat at start. Flush is the server's `fsync@openssh.com` extension (OpenSSH's sftp-server and
internal-sftp have it), and FUA a write followed by one; a server without it offers no flush
and no FUA, as nbdkit's plugin does then. Write-zeroes is emulated by writing zeros (a fast
zero is refused at once), trim and extents are not offered: the same flags nbdkit shows.

Multi-conn is advertised, as nbdkit does: every client's requests go to the same open file on
the server, so what one client's completed write put there another client reads, and an fsync
of that file (any client's flush) makes every completed write stable. Under `--workers` each
worker has its own SSH connection and SFTP handle of the same remote file; a write is in the
server's page cache when it completes, and fsync flushes the file, not the handle, so that
still holds.

How it differs from nbdkit's plugin, and why:
- nbdkit connects for each NBD client, so a wrong host, port, password or host key, or a missing
  file, fails every client's handshake while nbdkit runs on. This node connects once, at
  start, and exits 1 with the reason (the known-hosts mismatch, the refused connection, the
  authentication that failed, the SFTP error), as the http plugin does: an orchestrator sees a
  failed start, not a node that serves nobody.
- `create=true` creates (or truncates) the file at start, not at the first client; nbdkit
  too creates it once, so clients see the same file. With --workers it is done once, before
  the workers start.
- The connection is shared and comes back: when the server goes away (sshd killed, a
  network cut noticed by SSH keep-alives, about a minute for a silent one), requests fail
  with EIO and are counted, health is NOT_SERVING, and the next request connects again (one
  attempt at a time, shared by the requests waiting); once it succeeds the node serves again,
  to the clients that were connected too. nbdkit's plugin does not reconnect: its clients
  fail until they reconnect themselves. A file that comes back smaller than clients were told
  is not taken (reads past its end could not be served).
- A failed request is EIO whatever the SFTP status (SFTP version 3, which OpenSSH speaks, has
  one "failure" status for most errors); a read that the file cannot fill (it shrank) too.
- `identity=` must name a readable private key (nbdkit's libssh skips a missing one); an
  encrypted one is left to ssh-agent, as nbdkit says it must be. The defaults
  (~/.ssh/id_ed25519, id_ecdsa, id_rsa, id_dsa) and ssh-agent ($SSH_AUTH_SOCK) are tried after
  the identities given, as nbdkit's libssh does.
- `config=` is read by asyncssh, which knows most ssh_config(5) options but not all of
  libssh's; without it ~/.ssh/config and /etc/ssh/ssh_config are read, as nbdkit does.
- `timeout` bounds connecting and logging in, as nbdkit's; without it 30 s do, so that a
  reconnection to a host that does not answer cannot hold requests longer.

Params (nbdkit's names and meanings): `path` (magic, required: the remote file), `host`
(required), `user` (default: the local user name), `password` (`password=+FILE`, `-FD` or
`-` read it as nbdkit does, nodes/passwords.py; never shown by `ctl info`), `port` (a number
or a service name; default 22 or the config's), `identity` (a private key file; repeat it for
more), `known-hosts` (default ~/.ssh/known_hosts then /etc/ssh/ssh_known_hosts),
`verify-remote-host` (default true; false accepts any host key, open to a man in the middle),
`config` (an ssh_config file; empty: none), `create` with `create-size` (needed) and
`create-mode` (octal, default 0600), `timeout`, `compression` (zlib@openssh.com or zlib, if
the server allows it; default off, as nbdkit). In `identity`, `known-hosts` and `config`,
libssh's %-sequences are expanded: %d (~/.ssh), %u (local user), %l (local host name), %h
(remote host), %r (remote user), %p (port), %%.

Example: `nbdfabric node ssh host=backup.example user=bob disk.img --listen
unix:/tmp/s.sock`, then `qemu-img convert -O qcow2 'nbd+unix:///?socket=/tmp/s.sock'
disk.qcow2` (add `known-hosts=FILE` when the host key is not in ~/.ssh/known_hosts).
"""

from __future__ import annotations

import asyncio
import errno
import getpass
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

from pydantic import BeforeValidator, field_validator, model_validator

from ..base import Capabilities, Holes, Plugin, Support
from ..params import Duration, Many, Params, Size, param, repeated, secret
from ..passwords import check_form, read_secret
from ..registry import register
from ..values import whole_number

if TYPE_CHECKING:
    import asyncssh

log = logging.getLogger("nbdfabric.ssh")

#: Seconds to connect and log in when `timeout` does not say (a host that never answers must
#: not hold a reconnection, and the requests waiting for it, for the kernel's two minutes).
CONNECT_TIMEOUT = 30.0
#: SSH keep-alives: a server silent for this many intervals in a row is taken for gone, and
#: the requests waiting on it fail (a cut network otherwise holds them for ever).
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 4
#: Ciphers tried first, before asyncssh's default order (which begins with
#: chacha20-poly1305@openssh.com, as OpenSSH's): asyncssh builds that one from several Python
#: calls per packet, AES-GCM is one call into OpenSSL (AES-NI). Measured here with 4K SFTP reads
#: at QD16 over loopback: 246 us of CPU a request with chacha20, 116 with aes128-gcm
#: (bench/RESULTS.md, "ssh and python"). Both are among OpenSSH's defaults; a config file
#: that says `Ciphers` is followed instead.
PREFERRED_CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"
_CIPHERS_LINE = re.compile(r"^\s*ciphers\b", re.I | re.M)
#: The identity files tried after those given, as nbdkit's libssh does.
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa", "id_dsa")

_OCTAL_MODE = re.compile(r"0*[0-7]{1,4}", re.ASCII)

T = TypeVar("T")


def _port(value: Any) -> int:
    """A TCP port: a number 1-65535 or a service name (`ssh`), as nbdkit's port= takes."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected a port number or a service name")
    if isinstance(value, str):
        if value.strip().isascii() and value.strip().isdigit():
            value = whole_number(value)
        else:
            try:
                value = socket.getservbyname(value, "tcp")
            except (OSError, UnicodeError, ValueError):
                raise ValueError("expected a port number or a known service name") from None
    if not 1 <= value <= 65535:
        raise ValueError("a port is between 1 and 65535")
    return value


Port = Annotated[int, BeforeValidator(_port)]


class SshParams(Params):
    path: str = param(description="the remote file (relative: to the remote home directory)")
    host: str = param(description="name or address of the SSH server")
    user: str | None = param(None, description="remote user name (default: the local one)")
    password: str | None = secret(
        description="password: SECRET, +FILE (its first line), -FD (read from that inherited "
        "file descriptor) or - (asked for on the terminal)"
    )
    port: Port | None = param(None, description="SSH port number or service name (default 22)")
    identity: Many = repeated("a private key file to log in with (repeat for more)", path=True)
    known_hosts: str | None = param(
        None,
        description="known hosts file (default ~/.ssh/known_hosts, /etc/ssh/ssh_known_hosts)",
        path=True,
    )
    verify_remote_host: bool = param(
        True, description="check the server's host key against the known hosts"
    )
    config: str | None = param(
        None,
        description="ssh_config file to read (empty: none; default ~/.ssh/config and "
        "/etc/ssh/ssh_config)",
        path=True,
    )
    create: bool = param(False, description="create (or truncate) the remote file at start")
    create_size: Size | None = param(None, description="size of the file create=true makes")
    create_mode: str = param("0600", description="permissions (octal) of the file create makes")
    timeout: Duration = param(0.0, description="time limit to connect and log in (0: 30 s)")
    compression: bool = param(False, description="compress the SSH connection (zlib)")

    @field_validator("password")
    @classmethod
    def _password_form(cls, value: str | None) -> str | None:
        return None if value is None else check_form(value)

    @field_validator("path", "host")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("create_mode")
    @classmethod
    def _octal(cls, value: str) -> str:
        if not _OCTAL_MODE.fullmatch(value) or int(value, 8) > 0o7777:
            raise ValueError("expected an octal mode such as 0600 or 0644")
        return value

    @model_validator(mode="after")
    def _create_needs_a_size(self) -> SshParams:
        if self.create and self.create_size is None:
            raise ValueError("create=true needs create-size=SIZE (the size of the new file)")
        return self


class _Link:
    """One SSH connection, its SFTP session and the open remote file."""

    def __init__(self, conn: asyncssh.SSHClientConnection, file: asyncssh.SFTPClientFile) -> None:
        self.conn = conn
        self.file = file
        self.lost = False  #: the connection closed (set by its client's connection_lost)

    def close(self) -> None:
        self.lost = True
        self.conn.close()


@register
class Ssh(Plugin):
    """Serves a file on a remote host over SSH (SFTP)."""

    kind = "ssh"
    magic = "path"
    #: --workers: each worker logs in itself (start runs in it); create= is done before (share).
    shareable = True
    Params = SshParams
    params: SshParams

    def __init__(self, params: SshParams) -> None:
        super().__init__(params)
        self.size = 0
        self.requests = 0
        self.errors = 0
        self.reconnects = 0
        self.last_error = ""
        self.failing = False  #: the last request or connection failed (health)
        self.flushes = False  #: the server has fsync@openssh.com
        self._link: _Link | None = None
        self._connecting: asyncio.Future[_Link] | None = None
        self._created = False
        self._password: str | None = None
        self._password_read = False
        self._stopped = False

    # Lifecycle ----------------------------------------------------------------------------

    def share(self) -> None:
        """Before --workers forks: read the password and create the file once, here, not in
        each worker (a worker that is replaced would truncate the file again)."""
        self._secret()  # asked or read once, here: a -FD read by one worker is empty for others
        if self.params.create:
            asyncio.run(self._create_once())

    async def _create_once(self) -> None:
        link, _ = await self._open(create=True)
        link.close()
        await link.conn.wait_closed()

    async def start(self) -> None:
        logging.getLogger("asyncssh").setLevel(logging.WARNING)  # one line per packet at INFO
        self._link, self.size = await self._open(create=self.params.create and not self._created)

    async def stop(self) -> None:
        self._stopped = True
        if self._link is not None:
            self._link.close()
            await self._link.conn.wait_closed()
            self._link = None

    def _secret(self) -> str | None:
        """The password, read once (a -FD can be read only once)."""
        p = self.params
        if not self._password_read:
            if p.password is not None:
                # asyncssh wants text: the bytes as given, whatever they are (as the http node).
                self._password = read_secret("password", p.password, "password: ").decode(
                    "utf-8", "surrogateescape"
                )
            self._password_read = True
        return self._password

    def _where(self) -> str:
        p = self.params
        user = p.user or _local_user()
        port = f":{p.port}" if p.port is not None else ""
        return f"ssh {user}@{p.host}{port}"

    async def _open(self, create: bool) -> tuple[_Link, int]:
        """Log in, start SFTP and open the file (creating it first with `create`): the open
        file and its size. OSError saying what failed, for the start message and `ctl info`."""
        import asyncssh

        p = self.params
        options = self._options()
        timeout = p.timeout or CONNECT_TIMEOUT
        link: _Link | None = None

        class Watch(asyncssh.SSHClient):
            def connection_lost(self, exc: Exception | None) -> None:
                if link is not None:
                    link.lost = True

        try:
            conn, _ = await asyncssh.create_connection(
                Watch, p.host, connect_timeout=timeout, **options
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise OSError(
                errno.EACCES,
                f"{self._where()}: the server's host key is not verified ({exc.reason}): add "
                "it to known-hosts, or set verify-remote-host=false (open to a man in the "
                "middle)",
            ) from None
        except asyncssh.PermissionDenied as exc:
            raise OSError(errno.EACCES, f"{self._where()}: cannot log in: {exc.reason}") from None
        except asyncssh.Error as exc:
            raise OSError(errno.EIO, f"{self._where()}: {exc.reason}") from None
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"{self._where()}: timed out connecting") from None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            raise OSError(exc.errno or errno.EIO, f"{self._where()}: {why}") from None
        try:
            file, size = await self._open_file(conn, create)
        except BaseException:
            conn.close()
            raise
        link = _Link(conn, file)
        link.lost = conn.is_closed()  # lost before Watch could tell it
        return link, size

    async def _open_file(
        self, conn: asyncssh.SSHClientConnection, create: bool
    ) -> tuple[asyncssh.SFTPClientFile, int]:
        import asyncssh

        p = self.params
        try:
            sftp = await conn.start_sftp_client()
            if create:
                assert p.create_size is not None  # the params say so
                attrs = asyncssh.SFTPAttrs(permissions=int(p.create_mode, 8))
                async with sftp.open(p.path, "wb", attrs) as new:
                    await new.truncate(p.create_size)
                self._created = True
            file = await sftp.open(p.path, "rb" if self.read_only else "r+b")
            size = (await file.stat()).size or 0
            self.flushes = await _has_fsync(file)
        except (asyncssh.Error, OSError) as exc:
            why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise OSError(errno.EIO, f"{self._where()}: {p.path}: {why}") from None
        return file, size

    def _options(self) -> dict[str, Any]:
        """asyncssh.connect's keyword arguments for the params."""
        import asyncssh

        p = self.params
        user = p.user or _local_user()
        expand = _Expander(p.host, user, p.port or 22)
        options: dict[str, Any] = {
            "keepalive_interval": KEEPALIVE_INTERVAL,
            "keepalive_count_max": KEEPALIVE_COUNT_MAX,
            "compression_algs": ["zlib@openssh.com", "zlib", "none"] if p.compression else ["none"],
        }
        if p.user is not None:
            options["username"] = p.user
        if p.port is not None:
            options["port"] = p.port
        password = self._secret()
        if password is not None:
            options["password"] = password
        if p.config is None:
            defaults = [Path("~/.ssh/config").expanduser(), Path("/etc/ssh/ssh_config")]
            options["config"] = [str(f) for f in defaults if os.access(f, os.R_OK)]
        else:
            options["config"] = [expand(p.config)] if p.config else []
        if not any(_says_ciphers(f) for f in options["config"]):
            options["encryption_algs"] = PREFERRED_CIPHERS
        if not p.verify_remote_host:
            options["known_hosts"] = None
        elif p.known_hosts is not None:
            options["known_hosts"] = _readable("known-hosts", expand(p.known_hosts))
        else:
            defaults = [Path("~/.ssh/known_hosts").expanduser(), Path("/etc/ssh/ssh_known_hosts")]
            found = [str(f) for f in defaults if os.access(f, os.R_OK)]
            options["known_hosts"] = found or b""  # none: no host key is known
        keys: list[Any] = []
        for identity in p.identity:
            path = _readable("identity", expand(identity))
            try:
                keys += asyncssh.load_keypairs(path, ignore_encrypted=True)
            except (asyncssh.KeyImportError, ValueError) as exc:
                raise ValueError(f"identity={identity}: not a private key: {exc}") from None
        for name in DEFAULT_IDENTITIES:
            default = Path("~/.ssh", name).expanduser()
            if os.access(default, os.R_OK):
                try:
                    keys += asyncssh.load_keypairs(str(default), ignore_encrypted=True)
                except (asyncssh.KeyImportError, ValueError, OSError):
                    pass  # as libssh: a default key it cannot use is skipped
        if p.identity or keys:
            options["client_keys"] = keys
        return options

    # Facts ----------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return Capabilities(
            size=self.size,
            writable=not self.read_only,
            flush=self.flushes,
            fua=Support.EMULATE if self.flushes else Support.NONE,
            zero=Support.EMULATE,  # the session writes zeros
            fast_zero=True,  # ... and refuses a fast zero at once, as nbdkit does
            multi_conn=True,  # one remote file for every client (see the docstring)
        )

    def healthy(self) -> bool:
        return self._link is not None and not self._link.lost and not self.failing

    def status(self) -> dict[str, Any]:
        p = self.params
        out: dict[str, Any] = {
            "host": p.host,
            "port": p.port or 22,
            "user": p.user or _local_user(),
            "path": p.path,
            "size": self.size,
            "connected": self._link is not None and not self._link.lost,
            "compression": self._link.conn.get_extra_info("send_compression") if self._link else "",
            "cipher": self._link.conn.get_extra_info("send_cipher") if self._link else "",
            "fsync": self.flushes,
            "requests": self.requests,
            "errors": self.errors,
            "reconnects": self.reconnects,
        }
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    # Requests -------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        count = len(buf)
        # Opened in binary mode: bytes (the type says AnyStr).
        data = cast(bytes, await self._request(lambda f: f.read(count, offset)))
        if len(data) != count:
            self._failed(f"read {len(data)} of {count} bytes at {offset}: the file is shorter")
            raise OSError(errno.EIO, f"{self.params.path}: short read at {offset}")
        buf[:] = data
        return []

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "this export is read-only")
        data = bytes(buf)  # the session reuses its buffer once this returns; asyncssh may not
        await self._request(lambda f: f.write(data, offset))  # FUA: the session flushes next

    async def flush(self, flags: int) -> None:
        if not self.flushes:
            raise OSError(errno.EINVAL, "the SSH server has no fsync@openssh.com")
        await self._request(lambda f: f.fsync())

    async def _request(self, op: Callable[[asyncssh.SFTPClientFile], Awaitable[T]]) -> T:
        # In a Task of its own: asyncssh's waits may need one, and the session serves
        # requests without (nodes/server/eager.py).
        return await asyncio.get_running_loop().create_task(self._run(op))

    async def _run(self, op: Callable[[asyncssh.SFTPClientFile], Awaitable[T]]) -> T:
        import asyncssh

        self.requests += 1
        link = await self._current()
        try:
            result = await op(link.file)
        except (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection) as exc:
            link.close()  # the SFTP channel is gone: the next request logs in again
            self._failed(exc.reason or "SFTP connection lost")
            raise OSError(errno.EIO, f"{self._where()}: {exc.reason}") from None
        except asyncssh.SFTPError as exc:  # the server's answer to this request
            self._failed(exc.reason or str(exc))
            raise OSError(errno.EIO, f"{self._where()}: {exc.reason}") from None
        except (asyncssh.Error, OSError, ValueError) as exc:  # ValueError: a closed file
            link.close()
            why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            self._failed(why)
            raise OSError(errno.EIO, f"{self._where()}: {why}") from None
        self.failing = False
        return result

    async def _current(self) -> _Link:
        """The open file, logging in again first if the connection was lost (one attempt at a
        time: the requests that come meanwhile wait for it; each failure is theirs)."""
        link = self._link
        if link is not None and not link.lost:
            return link
        if self._stopped:
            raise OSError(errno.ESHUTDOWN, "the node is stopping")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._reconnect())
        attempt = self._connecting
        try:
            return await asyncio.shield(attempt)
        except OSError as exc:
            self._failed(exc.strerror or str(exc))
            raise OSError(errno.EIO, exc.strerror or str(exc)) from None

    async def _reconnect(self) -> _Link:
        try:
            old = self._link
            if old is not None:
                old.close()
            link, size = await self._open(create=False)
            if self._stopped:
                link.close()
                raise OSError(errno.ESHUTDOWN, "the node is stopping")
            if size < self.size:  # the file as clients know it, or more (they see no more)
                link.close()
                raise OSError(
                    errno.EIO,
                    f"{self._where()}: {self.params.path} is now {size} bytes, smaller than "
                    f"the {self.size} clients were told",
                )
            self._link = link
            self.reconnects += 1
            log.warning("%s: connected again", self._where())
            return link
        finally:
            self._connecting = None

    def _failed(self, why: str) -> None:
        self.errors += 1
        self.failing = True
        if why != self.last_error:
            log.warning("%s: %s", self._where(), why)
        self.last_error = why


async def _has_fsync(file: asyncssh.SFTPClientFile) -> bool:
    """Whether the server flushes files (fsync@openssh.com): an fsync of the file just opened
    says, and costs nothing."""
    import asyncssh

    try:
        await file.fsync()
    except asyncssh.SFTPOpUnsupported:
        return False
    return True


def _local_user() -> str:
    """The local user's name, as ssh(1) logs in by default (the uid where it has none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _says_ciphers(config: str) -> bool:
    """Whether an ssh_config file sets Ciphers anywhere (then its choice stands, whichever
    Host block it is in: a reading that errs towards the user's word)."""
    try:
        return bool(_CIPHERS_LINE.search(Path(config).read_text(errors="replace")))
    except OSError:
        return False  # asyncssh reports a config it cannot read


def _readable(key: str, path: str) -> str:
    """`path` if it can be read; else ValueError naming KEY=PATH and why."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{key}={path}: {exc.strerror}") from None
    return path


class _Expander:
    """libssh's %-sequences in identity=, known-hosts= and config=, then a leading ~."""

    def __init__(self, host: str, user: str, port: int) -> None:
        self.values = {
            "d": str(Path("~/.ssh").expanduser()),
            "u": _local_user(),
            "l": socket.gethostname(),
            "h": host,
            "r": user,
            "p": str(port),
            "%": "%",
        }

    def __call__(self, text: str) -> str:
        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in self.values:
                raise ValueError(
                    f"{text}: unknown %-sequence %{name} (known: %d %u %l %h %r %p %%)"
                )
            return self.values[name]

        return os.path.expanduser(re.sub(r"%(.)", one, text))
