"""log: write every request to a file as JSON lines (like nbdkit-log-filter, machine-readable).

One line per request once it has finished, plus `open`/`close` lines for each connection and a
`ready`/`stop` pair for the node. As the first filter it shows what clients ask; further down a
chain it shows what the filters above made of it.

Lines (`ts` is Unix time in seconds, `duration` in seconds):
    {"ts": ..., "event": "ready", "caps": {"size": 1048576, ...}}
    {"ts": ..., "event": "open", "connection": 1, "client": "127.0.0.1:50122", "export": "",
     "tls": false}
    {"ts": ..., "event": "request", "connection": 1, "id": 1, "op": "read", "offset": 0,
     "count": 512, "flags": [], "result": "ok", "duration": 0.00002}
    {"ts": ..., "event": "request", ..., "result": "error", "errno": "EIO", "error": "..."}
    {"ts": ..., "event": "close", "connection": 1, "transactions": 1}
`op` is read, write, trim, zero, extents, cache or flush; `flags` names NBD command flags
(fua, no_hole, df, req_one, fast_zero); `id` counts requests per connection. Block status in a
meta context other than base:allocation (a cow's dirty bitmap, passed through) is an `extents`
line with `"context": NAME`.

Params: `logfile=PATH` (without it the filter only passes requests on), `logappend` (yes|no,
default no: the file is truncated at start).

Example: `nbdfabric node log logfile=/tmp/requests.jsonl --upstream URI`
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar

from ..base import Backend, Extents, Filter, Holes, current_client
from ..params import Params, param
from ..protocol.constants import CmdFlag
from ..registry import register

T = TypeVar("T")


class LogParams(Params):
    logfile: str | None = param(None, "file to write JSON lines to", path=True)
    logappend: bool = param(False, "append to the file instead of truncating it")


def flag_names(flags: int) -> list[str]:
    return [f.name.lower() for f in CmdFlag if f.name and flags & f]


@register
class Log(Filter):
    """Logs each request, connection and lifecycle event as a JSON line."""

    kind = "log"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = LogParams
    params: LogParams

    def __init__(self, params: LogParams, next: Backend) -> None:
        super().__init__(params, next)
        self.file: IO[str] | None = None
        self.lines = 0
        self._ids: dict[int, int] = {}

    async def start(self) -> None:
        await self.next.start()
        if self.params.logfile:
            self.file = self._open(self.params.logfile, self.params.logappend)
        self._write({"event": "ready", "caps": self.next.capabilities().as_dict()})

    @staticmethod
    def _open(path: str, append: bool) -> IO[str]:
        # Line-sized writes to a local file: cheap enough to do on the event loop.
        return open(path, "a" if append else "w")

    async def stop(self) -> None:
        self._write({"event": "stop"})
        if self.file is not None:
            self.file.close()
            self.file = None
        await self.next.stop()

    def status(self) -> dict[str, Any]:
        return {**self.next.status(), "logfile": self.params.logfile, "log_lines": self.lines}

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        line = json.dumps({"ts": round(time.time(), 6), **record}, separators=(",", ":"))
        self.file.write(line + "\n")
        self.file.flush()  # one write per line, readable at once by tail -f and tests
        self.lines += 1

    async def open_connection(self) -> None:
        client = current_client.get()
        self._ids[client.connection_id] = 0
        await self.next.open_connection()
        self._write(
            {
                "event": "open",
                "connection": client.connection_id,
                "client": client.address,
                "export": client.export_name,
                "tls": client.tls,
            }
        )

    async def close_connection(self) -> None:
        conn = current_client.get().connection_id
        self._write({"event": "close", "connection": conn, "transactions": self._ids.pop(conn, 0)})
        await self.next.close_connection()

    async def _logged(
        self,
        op: str,
        offset: int,
        count: int,
        flags: int,
        call: Callable[[], Awaitable[T]],
        context: str = "",
    ) -> T:
        if self.file is None:
            return await call()
        conn = current_client.get().connection_id
        rid = self._ids[conn] = self._ids.get(conn, 0) + 1
        record: dict[str, Any] = {
            "event": "request",
            "connection": conn,
            "id": rid,
            "op": op,
            "offset": offset,
            "count": count,
            "flags": flag_names(flags),
        }
        if context:  # block status in a meta context other than base:allocation
            record["context"] = context
        started = time.perf_counter()
        try:
            result = await call()
        except OSError as exc:
            code = exc.errno or errno.EIO
            record.update(
                result="error",
                errno=errno.errorcode.get(code, str(code)),
                error=exc.strerror or str(exc),
            )
            raise
        except BaseException as exc:
            record.update(result="error", errno="EIO", error=repr(exc))
            raise
        else:
            record["result"] = "ok"
            return result
        finally:
            record["duration"] = round(time.perf_counter() - started, 9)
            self._write(record)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        return await self._logged(
            "read", offset, len(buf), flags, lambda: self.next.pread(buf, offset, flags)
        )

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._logged(
            "write", offset, len(buf), flags, lambda: self.next.pwrite(buf, offset, flags)
        )

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self._logged(
            "trim", offset, count, flags, lambda: self.next.trim(count, offset, flags)
        )

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._logged(
            "zero", offset, count, flags, lambda: self.next.zero(count, offset, flags)
        )

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return await self._logged(
            "extents", offset, count, flags, lambda: self.next.extents(count, offset, flags)
        )

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        return await self._logged(
            "extents",
            offset,
            count,
            flags,
            lambda: self.next.context_extents(context, count, offset, flags),
            context=context,
        )

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await self._logged(
            "cache", offset, count, flags, lambda: self.next.cache(count, offset, flags)
        )

    async def flush(self, flags: int) -> None:
        await self._logged("flush", 0, 0, flags, lambda: self.next.flush(flags))
