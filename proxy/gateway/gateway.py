"""What an operator's gateway adds around the routes, tied together per app by
:class:`Gateway`: request ids, client API keys, per-key limits, Prometheus metrics and
the audit log.

* **Request id** (:mod:`proxy.gateway.record`): ``X-Request-Id`` from the client when
  it is a plain token, else a new ``req_<hex>``; returned in the same header on every
  response and carried by every log line of the request (:mod:`proxy.gateway.logs`).
* **Auth** (:mod:`proxy.gateway.keys`, when ``server.keys`` is set): ``Authorization:
  Bearer <key>`` on every ``/v1/`` route, compared in constant time; 401 for no key or
  an unknown one, 403 for a model the key may not use.
* **Limits** (:mod:`proxy.gateway.limits`) per key: requests in flight and requests
  per minute; over either, 429 with ``Retry-After``.
* **Metrics** (``GET /metrics``): see :class:`proxy.gateway.prometheus.Metrics`.
* **Audit log** (:mod:`proxy.gateway.request_log`): one line per completion request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from proxy.config import ServerConfig
from proxy.gateway.limits import Limits
from proxy.gateway.prometheus import Metrics
from proxy.gateway.record import RequestRecord
from proxy.gateway.request_log import AuditLog, AuditLogError, utc_now
from proxy.protocol.errors import ProxyError

log = logging.getLogger(__name__)

#: Routes whose requests reach a model: limited, metered and audited.
COMPLETION_ROUTES = ("/v1/chat/completions", "/v1/completions")
LIMITED_ROUTES = (*COMPLETION_ROUTES, "/v1/batches")


def audit_record(rec: RequestRecord, status: int, with_text: bool) -> dict[str, Any]:
    """The audit log line of one request (see issue: time, request id, key id,
    model, offset sha256, α, tokens, tokens the offset changed, max |Δ|, status)."""
    out: dict[str, Any] = {
        "time": utc_now(),
        "request_id": rec.request_id,
        "key_id": rec.key_id,
        "endpoint": rec.endpoint,
        "model": rec.model,
        "offset_sha256": rec.offset_sha256,
        "alpha": rec.alpha,
        "completion_tokens": sum(s.completion_tokens for s in rec.stats),
        "offset_changed_tokens": sum(s.offset_changed for s in rec.stats),
        "max_abs_delta": max((s.max_abs_delta for s in rec.stats), default=0.0),
        "remote_calls": sum(s.remote_calls for s in rec.stats),
        "status": status,
        "error": rec.error,
        "seconds": round(time.monotonic() - rec.started, 4),
    }
    if with_text:
        out["prompt"] = rec.prompt
        out["output"] = rec.output
    return out


def audit_unavailable() -> ProxyError:
    """The error of a request whose audit line could not be written (its answer is withheld)."""
    return ProxyError(
        500,
        "The request could not be recorded in the audit log, so its answer is withheld",
        "server_error",
        None,
        "audit_log_unavailable",
    )


def cancelled_at_shutdown() -> ProxyError:
    """The error of a request that the shutdown cancelled after its grace period."""
    return ProxyError(
        503, "The request was cancelled: the server is shutting down", "server_error", None, "request_cancelled"
    )


@dataclass
class Gateway:
    """The per-app gateway state."""

    settings: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    audit: AuditLog | None = None
    models: frozenset[str] = frozenset()
    """Served model names (metrics label other names as ``-``: clients choose them)."""
    limits: Limits = field(init=False)
    stopping: bool = field(init=False, default=False)
    """Set at shutdown: new completion requests get 503, running ones their grace period."""
    _idle: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[Any]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.limits = Limits(self.settings)
        self._idle.set()

    @property
    def inflight(self) -> int:
        """Completion requests being served."""
        return len(self._tasks)

    def begin(self, rec: RequestRecord) -> None:
        """Register a completion request; call from its handler's task."""
        task = asyncio.current_task()
        assert task is not None, "begin() runs in the request handler's task"
        rec.task = task
        self._tasks.add(task)
        self._idle.clear()

    async def shutdown(self, grace: float) -> None:
        """Graceful stop: refuse new completion requests, give the running ones
        ``grace`` seconds, then cancel them (a stream ends with an SSE error
        event, a plain request gets a 503) and wait for their audit lines."""
        self.stopping = True
        if self.inflight:
            log.info("shutting down: %d request(s) in flight get up to %g s", self.inflight, grace)
            await self.drain(grace)
        if self.inflight:
            for task in list(self._tasks):
                task.cancel()
            await self.drain(5.0)

    def finish(self, rec: RequestRecord, status: int) -> None:
        """Count and audit one finished completion request.

        Raises:
            proxy.gateway.request_log.AuditLogError: its audit line could not be written.
        """
        try:
            self.record(rec, status)
        finally:
            if rec.task is not None:
                self._tasks.discard(rec.task)
            if not self._tasks:
                self._idle.set()

    def record(self, rec: RequestRecord, status: int) -> None:
        """Count and audit one request (also a batch line, which is not "in flight" here).

        Raises:
            proxy.gateway.request_log.AuditLogError: its audit line could not be written.
        """
        if status >= 400 and rec.error is None:
            rec.error = str(status)
        self.metrics.observe(rec, status, served=rec.model in self.models)
        if self.audit is not None:
            self.audit.append(audit_record(rec, status, self.settings.audit_log_text))

    def finish_quietly(self, rec: RequestRecord, status: int) -> None:
        """:meth:`finish` for a request that is already failing: a log failure is logged."""
        try:
            self.finish(rec, status)
        except AuditLogError as exc:
            log.error("request %s: %s", rec.request_id, exc)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the requests in flight to finish."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("%d request(s) still in flight after %g s; closing anyway", self.inflight, timeout)
