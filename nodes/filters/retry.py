"""retry: reopen the upstream and try again when a request fails (nbdkit-retry-filter).

Makes long copies survive short upstream failures (a restarted node, a dropped connection)
without the client noticing. On a failure the filter waits `retry-delay`, reopens the upstream
(when the upstream can: `reconnect()`), and repeats the request, up to `retries` times; with
`retry-exponential` the wait doubles each time. The last error goes to the client.

Which failures are retried:
- `retry-on=EIO,ECONNRESET`: only these errnos (default: every error).
- `retry-pattern=RRRORRRRRO`: a script, one letter per failure seen by this node, repeating:
  `R` retries it, `O` lets it through to the client. Handy to test clients against a flaky chain.
- Never a zero's ENOTSUP: that is the answer to a fast zero the upstream cannot do fast, due at
  once (qemu-img probes with one before a copy), not a failure.

Params (all live): `retries` (default 5), `retry-delay` (default 2s; `100ms` allowed),
`retry-exponential` (yes|no, default yes), `retry-readonly` (yes|no, default no: after a failure,
refuse writes on that connection for the rest of its life, as nbdkit reopens read-only),
`retry-on`, `retry-pattern`.

Example: `nbdfabric node retry retries=10 retry-delay=100ms --upstream nbd://flaky:10809`
"""

from __future__ import annotations

import errno
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer

from ..base import Backend
from ..params import Duration, Params, live
from ..registry import register
from ..values import parse_errno
from ._retrying import RetryingFilter, log


def _parse_errnos(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple):
        items = list(value)
    else:  # YAML `retry-on: 5`: list(5) raised TypeError out of validation
        raise ValueError("expected errno names separated by commas, e.g. EIO,ECONNRESET")
    codes = tuple(parse_errno(item) for item in items if str(item).strip())
    if not codes:
        raise ValueError("expected errno names separated by commas, e.g. EIO,ECONNRESET")
    return codes


def _errno_names(codes: tuple[int, ...]) -> str:
    return ",".join(errno.errorcode.get(c, str(c)) for c in codes)


def _parse_pattern(value: Any) -> str:
    text = str(value).strip().upper()
    if not re.fullmatch(r"[RO]+", text):
        raise ValueError("expected a pattern of R (retry) and O (let through), e.g. RRRO")
    return text


Errnos = Annotated[
    tuple[int, ...],
    BeforeValidator(_parse_errnos),
    PlainSerializer(_errno_names, return_type=str),
    Field(json_schema_extra={"format": "errno-list"}),
]
Pattern = Annotated[str, BeforeValidator(_parse_pattern)]


class RetryParams(Params):
    retries: int = live(5, "how many times one request is retried", ge=0)
    retry_delay: Duration = live(2.0, "wait before retrying (e.g. 2s, 100ms)")
    retry_exponential: bool = live(True, "double the wait after each retry")
    retry_readonly: bool = live(False, "after a failure, refuse writes on that connection")
    retry_on: Errnos | None = live(None, "retry only these errors (e.g. EIO,ECONNRESET)")
    retry_pattern: Pattern | None = live(None, "R = retry, O = let through, per failure, repeating")


@register
class Retry(RetryingFilter):
    """Retries failed requests, reopening the upstream in between."""

    kind = "retry"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = RetryParams
    params: RetryParams

    def __init__(self, params: RetryParams, next: Backend) -> None:
        super().__init__(params, next)
        self.failures = 0  #: failures seen (the position in retry-pattern)
        self.reopened = 0

    def status(self) -> dict[str, Any]:
        return {**super().status(), "reopened": self.reopened}

    def _policy(self) -> tuple[int, float, bool, bool]:
        p = self.params
        return p.retries, p.retry_delay, p.retry_exponential, p.retry_readonly

    def _should_retry(self, op: str, flags: int, exc: OSError) -> bool:
        p = self.params
        index = self.failures
        self.failures += 1
        if p.retry_on is not None and exc.errno not in p.retry_on:
            return False
        if p.retry_pattern:
            return p.retry_pattern[index % len(p.retry_pattern)] == "R"
        return True

    async def _between_attempts(self) -> None:
        await self._reopen()

    async def _reopen(self) -> None:
        reconnect = getattr(self.next, "reconnect", None)
        if reconnect is None:
            return
        try:
            await reconnect()
            self.reopened += 1
        except OSError as exc:  # the next attempt fails too and counts as a retry
            log.info("retry: reopening the upstream failed: %s", exc)
