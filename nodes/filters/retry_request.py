"""retry-request: retry a failing request, without reopening the upstream
(nbdkit-retry-request-filter).

For upstreams that fail now and then for no lasting reason (a flaky HTTP server behind an http
node, a load balancer that sends some requests nowhere): a request that fails is sent again,
after `retry-request-delay`, up to `retry-request-retries` times; the last error goes to the
client. Unlike the retry filter, nothing is reopened and the delay does not grow: the other
requests in flight go on meanwhile on the same upstream connection. Both filters share their
retry loop (`_retrying.py`).

Params (all live):
- `retry-request-retries` (0 to 1000, default 2): retries of one request (0: none).
- `retry-request-delay` (duration, default 2s; `100ms` allowed, 0 refused as nbdkit does).
- `retry-request-open` (bool, default true): a client that connects while the upstream is
  down waits for it as a request would (up to `retry-request-retries` waits of
  `retry-request-delay`, prodding the reconnect each time), and is disconnected if it is still
  down; with false it is let in at once.
- `retry-request-readonly` (bool, default false): after a request failed on a connection,
  writes, trims and zeroes on that connection fail with EROFS (retry's `retry-readonly`).

Example: `nbdfabric node retry-request retry-request-retries=5 retry-request-delay=200ms
--upstream nbd+unix:///?socket=http.sock`

Differences from nbdkit 1.32: a zero that fails with ENOTSUP is not retried: it is the answer
"this upstream cannot zero that way" (the session then writes zeros, or a fast zero fails fast
as the client asked), where nbdkit retries it and makes a fast zero wait `retries` delays.
nbdkit has no retry-request-readonly; it is here because the loop it belongs to is shared with
retry. A request's "open" is the connection's start (after the handshake, before its first
request), as our upstream connection is the node's and not opened per client.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from pydantic import field_validator

from ..base import Backend
from ..params import Duration, Params, live
from ..registry import register
from ._retrying import RetryingFilter, log


class RetryRequestParams(Params):
    retry_request_retries: int = live(2, "times one request is retried (0-1000)", ge=0, le=1000)
    retry_request_delay: Duration = live(2.0, "wait before each retry (e.g. 2s, 100ms)")
    retry_request_open: bool = live(True, "a client arriving while the upstream is down waits")
    retry_request_readonly: bool = live(False, "after a failure, refuse writes on that connection")

    @field_validator("retry_request_delay")
    @classmethod
    def _not_zero(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("retry-request-delay cannot be 0")
        return value


@register
class RetryRequest(RetryingFilter):
    """Retries a failed request on the same upstream connection."""

    kind = "retry-request"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = RetryRequestParams
    params: RetryRequestParams

    def __init__(self, params: RetryRequestParams, next: Backend) -> None:
        super().__init__(params, next)
        self.open_waits = 0

    def status(self) -> dict[str, Any]:
        return {**super().status(), "open_waits": self.open_waits}

    def _policy(self) -> tuple[int, float, bool, bool]:
        p = self.params
        return p.retry_request_retries, p.retry_request_delay, False, p.retry_request_readonly

    async def open_connection(self) -> None:
        p = self.params
        if p.retry_request_open and not self.next.healthy():
            await self._wait_for_upstream(p.retry_request_retries, p.retry_request_delay)
        await self.next.open_connection()

    async def _wait_for_upstream(self, retries: int, delay: float) -> None:
        for attempt in range(1, retries + 1):
            self.open_waits += 1
            log.info("retry-request: upstream down at open, retry %d in %.3fs", attempt, delay)
            await asyncio.sleep(delay)
            reconnect = getattr(self.next, "reconnect", None)
            if reconnect is not None:
                try:
                    await reconnect()
                except OSError:
                    continue
            if self.next.healthy():
                return
        raise OSError(errno.EIO, "retry-request: the upstream is still down")
