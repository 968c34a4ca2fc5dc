"""What an operator's gateway adds around the routes: request ids, client API
keys, per-key limits, Prometheus metrics and the audit log.

* **Request id**: ``X-Request-Id`` from the client when it is a plain token
  (letters, digits, ``._-``, at most 128), else a new ``req_<hex>``; returned
  in the same header on every response and carried by every log line of the
  request (:data:`request_id_var`).
* **Auth** (when ``server.keys`` is set): ``Authorization: Bearer <key>`` on
  every ``/v1/`` route. The key's sha256 is compared with every configured
  hash in constant time (``hmac.compare_digest``), so timing shows neither
  which key nor how much of it matched. No key or an unknown key: 401 with
  OpenAI's body; a model the key may not use: 403, before anything reaches
  the upstream.
* **Limits** per key (all clients together when there are no keys):
  requests in flight and requests per minute (moving window, the ``limits``
  package); over either, 429 with ``Retry-After`` (seconds) and OpenAI's
  ``rate_limit_exceeded`` body.
* **Metrics** (``GET /metrics``, prometheus-client, one registry per app):
  see :class:`Metrics`.
* **Audit log** (:mod:`proxy.gateway.request_log`): one line per completion request.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from prometheus_client import CollectorRegistry, Gauge, Histogram, ProcessCollector
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily

from proxy.api.errors import ProxyError
from proxy.config import ClientKey, ServerConfig
from proxy.gateway.request_log import AuditLog, AuditLogError, utc_now

log = logging.getLogger(__name__)

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
"""The id of the request being served, for log lines (:class:`RequestIdFilter`)."""

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Routes whose requests reach a model: limited, metered and audited.
COMPLETION_ROUTES = ("/v1/chat/completions", "/v1/completions")
LIMITED_ROUTES = (*COMPLETION_ROUTES, "/v1/batches")


REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_KEY = web.RequestKey("client_key", ClientKey)
"""The authenticated key; absent when the server has no keys."""


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # the access log passes its own
            record.request_id = request_id_var.get()
        return True


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log line, with the request's id (its context is gone by then).
    The path is logged without its query string."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        _access_line(self.logger, request, response.status, time)


def _access_line(logger: logging.Logger, request: web.BaseRequest, status: int, seconds: float, note: str = "") -> None:
    logger.info(
        '%s "%s %s" %d %.3fs%s',
        request.remote,
        request.method,
        request.path,
        status,
        seconds,
        note,
        extra={"request_id": request.get(REQUEST_ID, "-")},
    )


def log_client_closed(request: web.BaseRequest, seconds: float) -> None:
    """The access-log line of a request whose client went away before its answer was done:
    aiohttp cancels the handler and logs nothing, so it is written here, in
    :class:`AccessLogger`'s format, with nginx's status 499 ("client closed request")."""
    _access_line(logging.getLogger("aiohttp.access"), request, 499, seconds, " (client closed the request)")


@dataclass
class RequestRecord:
    """What the gateway learns about one completion request while it is served."""

    request_id: str
    key_id: str | None
    endpoint: str
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    offset_sha256: str | None = None
    alpha: float | None = None
    first_token: float | None = None
    """``time.monotonic()`` when the first content was sent (streams)."""
    job: Any = None
    """The request's :class:`proxy.api.choices.Job`, once it is validated."""
    error: str | None = None
    """The error code of a failure, also one sent inside a 200 stream."""
    prompt: Any = None
    output: list[str] | None = None
    streamed: bool = False
    """The response is a stream whose headers are sent."""
    task: asyncio.Task[Any] | None = None
    """The handler's task (cancelled when a shutdown's grace period ends)."""

    def asked_for(self, body: Any) -> None:
        """Note the model a request body names, before it is validated (also when it is refused)."""
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            self.model = body["model"][:200]

    def set_job(self, job: Any) -> None:
        """Take model, α and offset from the validated :class:`proxy.api.choices.Job`."""
        self.job, self.model, self.alpha = job, job.model.name, job.params.alpha
        self.offset_sha256 = job.model.offset_sha256 if job.model.uses_offset else None

    @property
    def stats(self) -> list[Any]:
        """The job's :class:`proxy.decoding.decoder.ChoiceStats`, one per choice."""
        return list(self.job.stats) if self.job is not None else []


class Metrics:
    """The Prometheus metrics of one app (its own registry).

    ``deltaproxy_requests_total{model,key,status}``,
    ``deltaproxy_request_seconds{model}``,
    ``deltaproxy_time_to_first_token_seconds{model}`` (streams),
    ``deltaproxy_remote_calls_per_request{model}``,
    ``deltaproxy_completion_tokens_total{model}``,
    ``deltaproxy_offset_changed_tokens_total{model}`` (tokens whose choice
    the offset changed), ``deltaproxy_upstream_errors_total{kind}``,
    ``deltaproxy_asyncio_tasks`` and the ``process_*`` metrics (open file
    descriptors, resident memory) of prometheus-client's process collector.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = PromCounter(
            "deltaproxy_requests",
            "Completion requests by model, key and HTTP status",
            ["model", "key", "status"],
            registry=r,
        )
        self.seconds = Histogram("deltaproxy_request_seconds", "Request wall time", ["model"], registry=r)
        self.ttft = Histogram(
            "deltaproxy_time_to_first_token_seconds", "Time to the first streamed token", ["model"], registry=r
        )
        self.remote_calls = Histogram(
            "deltaproxy_remote_calls_per_request",
            "Upstream calls per request",
            ["model"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.tokens = PromCounter("deltaproxy_completion_tokens", "Generated tokens", ["model"], registry=r)
        self.changed = PromCounter(
            "deltaproxy_offset_changed_tokens",
            "Generated tokens whose choice the offset changed",
            ["model"],
            registry=r,
        )
        self.upstream_errors = PromCounter(
            "deltaproxy_upstream_errors", "Failed requests caused by the upstream, by kind", ["kind"], registry=r
        )
        ProcessCollector(registry=r)  # process_open_fds, process_resident_memory_bytes, ...
        tasks = Gauge("deltaproxy_asyncio_tasks", "asyncio tasks alive (read while serving /metrics)", registry=r)
        tasks.set_function(_task_count)

    def observe(self, rec: RequestRecord, status: int, served: bool = True) -> None:
        model = rec.model if rec.model and served else "-"
        self.requests.labels(model, rec.key_id or "-", str(status)).inc()
        self.seconds.labels(model).observe(time.monotonic() - rec.started)
        if rec.first_token is not None:
            self.ttft.labels(model).observe(rec.first_token - rec.started)
        if rec.stats:
            self.remote_calls.labels(model).observe(sum(s.remote_calls for s in rec.stats))
            self.tokens.labels(model).inc(sum(s.completion_tokens for s in rec.stats))
            self.changed.labels(model).inc(sum(s.offset_changed for s in rec.stats))
        # a failed request, or a 200 stream that failed inside; client mistakes (4xx) are not counted
        if (status >= 500 or status == 200) and rec.error and rec.error.startswith(("upstream", "bad_upstream")):
            self.upstream_errors.labels(rec.error).inc()


class PairCollector:
    """The local pairs' counters, read at each scrape (one series per pair and offset):
    ``deltaproxy_pair_passes_total`` (forward passes of the pair's tree batcher, each one
    per model), ``deltaproxy_pair_tree_jobs_total`` (requests' tree passes run in them:
    jobs / passes is the mean batch), ``deltaproxy_pair_prefix_cache_hits_total`` and
    ``deltaproxy_pair_prefix_cache_tokens_total`` (prompts that began like a cached one,
    and the tokens they did not run again)."""

    def __init__(self, models: Mapping[str, Any]) -> None:
        self.models = models

    def collect(self) -> Iterator[CounterMetricFamily]:
        labels = ["pair", "offset"]
        families = {
            "passes": CounterMetricFamily(
                "deltaproxy_pair_passes", "Batched forward passes of the pair", labels=labels
            ),
            "jobs": CounterMetricFamily(
                "deltaproxy_pair_tree_jobs", "Requests' tree passes run in batched passes", labels=labels
            ),
            "hits": CounterMetricFamily(
                "deltaproxy_pair_prefix_cache_hits", "Prompts that began like a cached one", labels=labels
            ),
            "tokens": CounterMetricFamily(
                "deltaproxy_pair_prefix_cache_tokens", "Prompt tokens taken from the prefix cache", labels=labels
            ),
        }
        seen: set[int] = set()
        for model in self.models.values():
            pair: Any = getattr(model, "pair", None)
            batcher = getattr(pair, "batcher", None)
            if batcher is None or id(pair) in seen:
                continue
            seen.add(id(pair))
            offset = pair.offset.sha256[:12] if pair.offset is not None else "-"
            values = {"passes": batcher.passes, "jobs": batcher.jobs, "hits": 0, "tokens": 0}
            if pair.prefix_cache is not None:
                values.update(hits=pair.prefix_cache.hits, tokens=pair.prefix_cache.tokens_reused)
            for name, family in families.items():
                family.add_metric([pair.name, offset], values[name])
        yield from families.values()


def _task_count() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # no running loop (a scrape outside the server)
        return float("nan")


class Limits:
    """Per-key requests in flight and requests per minute."""

    def __init__(self, settings: ServerConfig) -> None:
        self.settings = settings
        self.active: Counter[str] = Counter()
        self.window = MovingWindowRateLimiter(MemoryStorage())

    def _for(self, key: ClientKey | None) -> tuple[str, int, int]:
        s = self.settings
        if key is None:
            return "-", s.key_max_concurrent, s.key_rpm
        return key.id, key.max_concurrent or s.key_max_concurrent, key.rpm or s.key_rpm

    async def enter(self, key: ClientKey | None) -> str:
        """Take a slot for ``key``; returns the slot's name for :meth:`leave`.

        Raises:
            ProxyError: 429 with ``Retry-After`` when a limit is reached.
        """
        name, concurrent, rpm = self._for(key)
        if self.active[name] >= concurrent:
            raise ProxyError(
                429,
                f"Too many requests in flight for this key (limit {concurrent}); retry when one has finished",
                "requests",
                None,
                "rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        item = RateLimitItemPerMinute(rpm)
        if not await self.window.hit(item, name):
            stats = await self.window.get_window_stats(item, name)
            wait = max(1, math.ceil(stats.reset_time - time.time()))
            raise ProxyError(
                429,
                f"Rate limit reached: {rpm} requests per minute for this key; retry in {wait} s",
                "requests",
                None,
                "rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )
        self.active[name] += 1
        return name

    def leave(self, name: str) -> None:
        self.active[name] -= 1
        if self.active[name] <= 0:
            del self.active[name]


def find_key(settings: ServerConfig, authorization: str | None) -> ClientKey:
    """The configured key for an ``Authorization`` header value.

    Raises:
        ProxyError: 401, no bearer key or an unknown one (the key is never echoed).
    """
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ProxyError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
            None,
            None,
        )
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    found = None
    for key in settings.keys:  # every hash is compared: the time does not depend on which matched
        if hmac.compare_digest(digest, key.sha256):
            found = key
    if found is None:
        raise ProxyError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
    return found


def check_model(request: web.Request, model: str) -> None:
    """Raise 403 when the request's key may not use ``model``."""
    key = request.get(CLIENT_KEY)
    if key is not None and not key.allows(model):
        raise ProxyError(
            403,
            f"This API key is not allowed to use the model '{model}'",
            "invalid_request_error",
            "model",
            "model_not_allowed",
        )


def allowed_models(request: web.Request, names: Any) -> list[str]:
    key = request.get(CLIENT_KEY)
    return [n for n in names if key is None or key.allows(n)]


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


RECORD = web.RequestKey("record", RequestRecord)
"""The :class:`RequestRecord` of a completion request."""


def new_request_id(header: str | None) -> str:
    if header and _REQUEST_ID_RE.match(header):
        return header
    return f"req_{uuid.uuid4().hex}"


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
