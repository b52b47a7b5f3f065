"""exportname: choose the export list clients see and the upstream export each name leads to
(nbdkit-exportname-filter).

A client's export name goes to the upstream: the filter opens one upstream connection per
export asked for (the `--upstream` URI with that name in its path), shared by the clients of
that export, so the node serves as many exports as the upstream does (file dir= behind it: one
per file). The default export "" leads to `default-export` if it is given, else to the export
the URI names. What NBD_OPT_LIST shows, and which names are let through, is set here:

- `exportname-list=keep` (default): the upstream's own list; `error`: listing is refused
  (NBD_REP_ERR_POLICY); `empty`: an empty list; `defaultonly` (or `default-only`): only the
  canonical name of the default export; `explicit`: only the `exportname=` names.
- `exportname=NAME` (repeatable): names for `explicit` and `exportname-strict`.
- `exportname-strict` (bool, default false): refuse (NBD_REP_ERR_UNKNOWN) every name not given
  with `exportname=`; "" too, unless `exportname=` (empty) is given, and then "" leads to
  `default-export`, which must be given with `exportname=` as well.
- `exportdesc`: `keep` (default: the upstream's descriptions), `none`, `fixed:STRING` (the same
  for every export), `script:SCRIPT` (run by the shell with `$name` set to the export's name;
  its output, up to 4096 bytes, without one final newline).

Params: `default-export`, `exportname-list`, `exportname-strict`, `exportname`, `exportdesc`
(also with underscores, as nbdkit spells them).

Example: `nbdfabric node exportname exportname-list=explicit exportname-strict=true
exportname=a.img exportname=c.img --upstream nbd+unix:///?socket=dir.sock` in front of
`nbdfabric node file dir=/srv/disks`: clients see and reach a.img and c.img, nothing else.

The node serves several exports, so it takes no --export-name; in a topology its upstream
references may name one (`NODE/NAME`) or none (the default export). An upstream export is
opened while the client that asked waits (within --handshake-limit); a name the upstream
refuses is refused to the client. At most 16 exports no client uses stay open (the least
recently asked for are closed first, and reopened for a client that asked before that).

Differences from nbdkit 1.32: a refused list is NBD_REP_ERR_POLICY, which the spec gives for
"server configuration has that disabled" (nbdkit answers NBD_REP_ERR_PLATFORM, which the spec
says is not used; libnbd reports ENOTSUP for either). `defaultonly` shows the description
`exportdesc` gives it (nbdkit's has none, whatever exportdesc says). An `exportname=` given
twice is listed once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator

from ..base import Backend, Capabilities, Filter, MultiExport
from ..params import Many, Params, param, repeated
from ..params import Params as ParamsModel
from ..registry import register
from ..server.addresses import export_name
from ..spawn import DEVNULL, PIPE, shell
from ..upstream import Catalog, Upstream

log = logging.getLogger("nbdfabric.exportname")

#: Exports no client uses that stay open (least recently asked for closed first).
MAX_IDLE = 16
#: The longest description sent (the spec's limit on a string).
MAX_DESCRIPTION = 4096
#: Description scripts run at once for one listing.
SCRIPTS_AT_ONCE = 8
#: Script descriptions remembered (about this many names; they are asked for again).
MAX_DESCRIBED = 256


def _list_mode(value: Any) -> Any:
    return "defaultonly" if value == "default-only" else value


def _export_desc(value: Any) -> str:
    text = str(value)
    if text in ("keep", "none") or text.startswith(("fixed:", "script:")):
        return text
    raise ValueError("expected keep, none, fixed:STRING or script:SCRIPT")


ListMode = Annotated[
    Literal["keep", "error", "empty", "defaultonly", "explicit"], BeforeValidator(_list_mode)
]
ExportDesc = Annotated[str, BeforeValidator(_export_desc)]


class ExportnameParams(Params):
    default_export: str = param("", 'the export a client asking for "" gets')
    exportname_list: ListMode = param("keep", "what NBD_OPT_LIST shows")
    exportname_strict: bool = param(False, "refuse names not given with exportname=")
    exportname: Many = repeated("a name to list (explicit) or let through (strict)")
    exportdesc: ExportDesc = param("keep", "keep | none | fixed:STRING | script:SCRIPT")

    def names(self) -> list[str]:
        """The exportname= names, each once, in order."""
        return list(dict.fromkeys(self.exportname))


class _Export(Filter):
    """One upstream export, as its clients reach it: the upstream connection to it and the
    name and description they are told."""

    def __init__(self, owner: ExportName, target: str, upstream: Upstream) -> None:
        super().__init__(owner.params, upstream)
        self.owner = owner
        self.target = target  #: the upstream export's name, as asked for
        self.users = 0
        self.closed = False
        #: Reopened while another took its place among the open: closed with its last user.
        self.orphan = False

    async def open_connection(self) -> None:
        if self.closed:  # closed as idle between this client's lookup and now: open again
            await self.owner.reopen(self)
        self.users += 1
        await self.next.open_connection()

    async def close_connection(self) -> None:
        self.users -= 1
        await self.next.close_connection()
        if self.orphan and not self.users:
            await self.owner.close_export(self)

    def export_identity(self, requested: str) -> tuple[str, str]:
        up = self.next
        assert isinstance(up, Upstream)
        return up.canonical_name, self.owner.description(self.target, up.description)


@register
class ExportName(Filter):
    """Maps export names onto the upstream's exports and sets the export list."""

    kind = "exportname"
    Params = ExportnameParams
    params: ExportnameParams
    prepares_exports = True

    def __init__(self, params: ExportnameParams, next: Backend) -> None:
        super().__init__(params, next)
        if not isinstance(next, Upstream):
            raise TypeError("exportname opens exports of an NBD upstream (--upstream URI)")
        self.upstream: Upstream = next  #: the URI as given: siblings are opened from it
        #: Open exports by upstream name, least recently asked for first.
        self.open: collections.OrderedDict[str, _Export] = collections.OrderedDict()
        self._opening: dict[str, asyncio.Future[_Export]] = {}
        self._catalog = Catalog([], "", export_name(next.uri))
        self._catalog_error = ""
        self._scripted: dict[str, str] = {}  #: script:SCRIPT descriptions, by name
        self.opened = 0

    @classmethod
    def multi_export(cls, params: ParamsModel) -> MultiExport | None:
        return "names"

    # Lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Wait for the upstream to answer (it may be starting too), as a filter's start waits
        for its upstream; no export is opened until a client asks for one."""
        deadline = asyncio.get_running_loop().time() + self.upstream.connect_timeout
        delay = 0.05
        while True:
            try:
                await self._refresh_catalog()
                return
            except OSError as exc:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise OSError(exc.errno, f"exportname: upstream {self.upstream.uri}: "
                                  f"{exc.strerror or exc}") from None  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def stop(self) -> None:
        for future in self._opening.values():
            future.cancel()
        exports, self.open = list(self.open.values()), collections.OrderedDict()
        for export in exports:
            await self.close_export(export)
        await self.upstream.stop()

    def capabilities(self) -> Capabilities:
        # The node as a whole (control plane, shutdown): each export has its own.
        return Capabilities(size=0, writable=True, flush=True)

    async def flush(self, flags: int) -> None:
        for export in list(self.open.values()):
            if export.next.capabilities().flush:
                await export.flush(flags)

    def healthy(self) -> bool:
        return all(e.next.healthy() for e in self.open.values())

    def status(self) -> dict[str, Any]:
        entries = [e for x in self.open.values() for e in x.next.status().get("upstreams", [])]
        return {
            "upstreams": entries,
            "exportname": {
                "open": {name: {"connections": x.users} for name, x in self.open.items()},
                "opened": self.opened,
                "list": self.params.exportname_list,
            },
        }

    # Names --------------------------------------------------------------------------------

    def target(self, name: str) -> str | None:
        """The upstream export a client's `name` leads to, or None to refuse it."""
        p = self.params
        if p.exportname_strict:
            allowed = p.names()
            if name not in allowed:
                return None
            if name == "":
                name = p.default_export
                if name not in allowed:  # nbdkit checks the name it opens too
                    return None
        elif name == "":
            name = p.default_export
        if name == "":  # the upstream's default: the export the URI names
            return self._catalog.default_name
        return name

    def _default_listed(self) -> list[str]:
        """defaultonly's list: the canonical name of the default export, if it has one."""
        p = self.params
        if p.exportname_strict:
            return [p.default_export] if "" in p.names() else []
        return [p.default_export or self._catalog.default_name]

    def exports(self) -> list[tuple[str, str]]:
        mode = self.params.exportname_list
        if mode == "error":
            raise OSError(errno.EPERM, "export list restricted by policy")
        if mode == "empty":
            return []
        if mode == "keep":
            if self._catalog_error:
                raise OSError(errno.EPERM, self._catalog_error)
            return [(n, self.description(n, d)) for n, d in self._catalog.exports]
        names = self._default_listed() if mode == "defaultonly" else self.params.names()
        return [(n, self.description(n, "")) for n in names]

    def description(self, name: str, upstream: str) -> str:
        """What exportdesc makes of export `name`, whose upstream says `upstream`."""
        mode = self.params.exportdesc
        if mode == "keep":
            return upstream
        if mode.startswith("fixed:"):
            return mode[len("fixed:") :]
        if mode.startswith("script:"):
            return self._scripted.get(name, "")
        return ""

    def for_export(self, name: str) -> Backend | None:
        target = self.target(name)
        return None if target is None else self.open.get(target)

    # Preparing (the handshake waits) -------------------------------------------------------

    async def prepare_export(self, name: str | None) -> None:
        if name is None:
            await self._prepare_list()
            return
        target = self.target(name)
        if target is None:
            return
        export = self.open.get(target)
        if export is not None:
            self.open.move_to_end(target)
        else:
            await self._open(target)
        await self._describe([target])

    async def _prepare_list(self) -> None:
        mode = self.params.exportname_list
        if mode in ("keep", "defaultonly"):
            try:
                await self._refresh_catalog()
            except OSError as exc:
                self._catalog_error = f"the upstream's export list: {exc.strerror or exc}"
        if mode not in ("error", "empty"):
            with contextlib.suppress(OSError):
                await self._describe([n for n, _ in self.exports()])

    async def _refresh_catalog(self) -> None:
        catalog = await self.upstream.catalog()
        self._catalog, self._catalog_error = catalog, ""
        if catalog.list_error:
            self._catalog_error = f"the upstream refused its list: {catalog.list_error}"

    async def _open(self, target: str) -> None:
        """Open export `target` (once, whoever else waits for it too)."""
        future = self._opening.get(target)
        if future is None:
            future = asyncio.ensure_future(self._connect(target))
            self._opening[target] = future
            future.add_done_callback(lambda _: self._opening.pop(target, None))
        try:
            export = await asyncio.shield(future)  # a client that gives up stops no one else
        except OSError as exc:
            log.info("exportname: export %r: %s", target, exc.strerror or exc)
            return
        if self.open.get(target) is export:
            self.open.move_to_end(target)
        await self._close_idle()

    async def _connect(self, target: str) -> _Export:
        upstream = self.upstream.sibling(target)
        await upstream.connect_once()
        self.opened += 1
        export = _Export(self, target, upstream)
        # Listed here, not by the waiters: the future's done callback takes it off _opening a
        # loop turn before they resume, and a client asking in that turn would open another.
        self.open[target] = export
        return export

    async def reopen(self, export: _Export) -> None:
        """An export closed as idle after a client looked it up: that client still gets it."""
        upstream = self.upstream.sibling(export.target)
        await upstream.connect_once()
        export.next, export.closed = upstream, False
        self.opened += 1
        if export.target in self.open:  # opened again meanwhile, for others: keep both
            export.orphan = True
        else:
            self.open[export.target] = export

    async def _close_idle(self) -> None:
        idle = [name for name, x in self.open.items() if not x.users]
        for name in idle[: max(0, len(idle) - MAX_IDLE)]:
            await self.close_export(self.open.pop(name))

    @staticmethod
    async def close_export(export: _Export) -> None:
        export.closed = True
        await export.next.stop()

    async def _describe(self, names: list[str]) -> None:
        """Run exportdesc's script for each name (several at once)."""
        mode = self.params.exportdesc
        if not mode.startswith("script:"):
            return
        script = mode[len("script:") :]
        gate = asyncio.Semaphore(SCRIPTS_AT_ONCE)

        async def one(name: str) -> None:
            async with gate:
                self._scripted[name] = await run_description_script(script, name)

        if len(self._scripted) > 4 * MAX_DESCRIBED:
            self._scripted.clear()  # each lookup and listing runs the script again anyway
        await asyncio.gather(*(one(n) for n in dict.fromkeys(names)))


async def run_description_script(script: str, name: str) -> str:
    """The output of `script` run by the shell with $name set, cut to a description."""
    proc = await shell(script, stdin=DEVNULL, stdout=PIPE, env={**os.environ, "name": name})
    assert proc.stdout is not None
    out, ended = b"", False
    try:
        while len(out) < MAX_DESCRIPTION:
            chunk = await proc.stdout.read(MAX_DESCRIPTION - len(out))
            if not chunk:
                ended = True
                break
            out += chunk
    finally:
        if not ended and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # more than a description holds, or the client gave up
        await proc.wait()
    text = out.decode(errors="replace").replace("\0", "")
    return text[:-1] if text.endswith("\n") else text
