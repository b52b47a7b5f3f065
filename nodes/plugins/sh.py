"""sh: a disk served by a script, or any executable, run once per method (nbdkit-sh-plugin).

The script is run as `SCRIPT METHOD ARGS...` for each plugin method, with nbdkit's arguments
and exit statuses (nodes/plugins/_script.py): `get_size` prints the size, `pread HANDLE COUNT
OFFSET` prints exactly COUNT bytes, `pwrite HANDLE COUNT OFFSET FLAGS` reads them on stdin,
`extents` prints `OFFSET LENGTH TYPE` lines; exit 0 done, 1 failed (stderr `ENOSPC message`
says the errno), 2 not implemented (nbdkit's default), 3 false. `$tmpdir` is a directory the
script may keep state in, removed when the node exits.

Methods, in nbdkit's order: `load`, `magic_config_key`, `config KEY VALUE` (once for every
param that is not the node's own, in the order given), `config_complete`, `thread_model`,
`get_ready`, `after_fork` (nbdkit runs it once it is in the background, or at once in the
foreground: here, once, before the node serves), then for each client `preconnect READONLY`,
`list_exports READONLY TLS` or `default_export READONLY TLS` when it asks, `open READONLY
EXPORTNAME TLS` (prints the handle), `get_size`, `can_write`, `can_zero`, `can_fast_zero`,
`can_trim`, `can_fua` (none, emulate or native), `can_flush`, `is_rotational`, `can_multi_conn`,
`can_cache` (none, emulate or native), `can_extents`, `block_size`, `export_description`, its
requests (`pread`, `pwrite`, `flush`, `trim`, `zero` with flags `fua,may_trim,fast`, `extents`
with `req_one`, `cache`), `close`; `unload` at exit. The can_* methods must be written for the
requests they announce (missing, they are false). `dump_plugin` is never run (there is no
--dump-plugin). Requests run one at a time in the whole node unless thread_model says
`serialize_requests` (one per client), `serialize_connections` (one client at a time) or
`parallel`.

Params: `script` (magic: the executable; `-` reads a script from stdin, run by /bin/sh without
#!), `script-timeout` (default 60s; 0 none, as nbdkit), and any other `key=value`, passed to
`config`; a word without `key=` after the script goes to `config` with the key the script's
`magic_config_key` prints.

Example: `nbdfabric node sh ./disk.sh file=disk.img --listen unix:/tmp/sh.sock` with a disk.sh
like nbdkit's example.sh (`get_size) stat -L -c %s "$(cat $tmpdir/file)"`, `pread) dd
if=... skip=$4 count=$3 iflag=skip_bytes,count_bytes`, ...).

A run that is killed by a signal, prints what cannot be parsed or the wrong number of bytes
fails that request with EIO (an export it cannot describe is refused to the client), with a
line in the node's log; the node serves on. As it serves the export names the script takes
(and lists), the node takes no --export-name.

Differences from nbdkit 1.32: a script that runs longer than `script-timeout` is killed, with
whatever it started, and its request fails with EIO (nbdkit waits for it forever, and so do
its other clients under the default thread model). A read of the wrong length is EIO (nbdkit
sets no errno for it: the client gets a stale one). A client's export is opened when it looks
it up (NBD_OPT_INFO or GO) and, looked up again by name, keeps its handle (nbdkit opens and
closes for each INFO); an export whose open or can_* fails is refused as unknown (nbdkit drops
the connection for some). Requests that break the script's block_size are refused with EINVAL
(nbdkit passes them on). A key given several times goes to `config` with each value where it
was first given; bare values where the first was. An errno name the script prints is any
the system knows (EACCES reaches the client as EPERM, where nbdkit says EIO). A list's last
line counts without its newline too (nbdkit drops it in INTERLEAVED mode).
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from ..params import param
from ..registry import register
from ._script import OK, ScriptParams, ScriptPlugin


class ShParams(ScriptParams):
    takes_bare_words = True  # for the script's magic_config_key
    script: str = param(
        description="the script or executable run for each method; - reads it from stdin",
        path=True,
    )


@register
class Sh(ScriptPlugin):
    """A disk served by a script run once per method (nbdkit's sh plugin)."""

    kind = "sh"
    Params = ShParams
    params: ShParams
    magic = "script"
    no_config = "the script has no config method (it exits 2), so it takes no parameters"

    def __init__(self, params: ShParams) -> None:
        super().__init__(params)
        self.program = params.script

    @property
    def name(self) -> str:
        return self.params.script

    def method_argv(self, method: str) -> list[str]:
        return [self.program, method]

    async def load(self) -> None:
        self.program = self._inline() if self.params.script == "-" else self._resolved()
        await self._startup("load")
        reply = await self._startup("magic_config_key", output=True)
        self.magic_key = reply.text.strip() if reply.status == OK else None

    def _resolved(self) -> str:
        path = os.path.realpath(self.params.script)  # as nbdkit: the cwd may change
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", self.name)
        if not os.access(path, os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied (not executable)", self.name)
        return path

    def _inline(self) -> str:
        """script=-: the script from stdin, kept in $tmpdir (run by /bin/sh without #!)."""
        if stat.S_ISSOCK(os.fstat(sys.stdin.fileno()).st_mode):
            raise OSError(errno.EINVAL, "script=- reads the script from stdin, a socket here")
        path = os.path.join(self.tmpdir, "inline-script")
        with open(path, "wb") as f:
            f.write(sys.stdin.buffer.read())
        os.chmod(path, 0o500)
        return path
