"""Batch runs in OpenAI's Batch API format, resumable.

Input, one JSON object per line (OpenAI API reference, "Batch", "The request
input object")::

    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

``url`` is ``/v1/chat/completions`` or ``/v1/completions``; ``body`` is that
endpoint's request (``stream`` is refused, as OpenAI's batches do).

Output, one line per input line, in the order lines finish ("The request
output object")::

    {"id": "batch_req_…", "custom_id": "a",
     "response": {"status_code": 200, "request_id": "…", "body": {...}}, "error": null}

A request that the proxy refuses or the upstream fails keeps its
``response`` with the error status and OpenAI's error body. A line that is
not a request at all (not JSON, no ``method``, unknown ``url``, duplicate
``custom_id``) gets ``"response": null`` and ``"error": {"code", "message",
"line"}`` (``line`` is 1-based; ``custom_id`` is null when none could be
read) and the run goes on (``tests/test_batch.py``).

Resuming (:class:`proxy.jobs.runner.LineRunner`): the output file is the
record of what is done. Each line is appended with one ``write`` and flushed;
a restarted run reads it back, drops a last line cut off mid-write, and skips
every input line already answered, so no line is lost or written twice. The
progress file ``<out>.progress.json`` (written atomically) ties the output to
its input's sha256, so an output is never continued from a different input,
and holds the counts.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proxy.config import ServerConfig
from proxy.decoding.served import ServedModel
from proxy.gateway.gateway import audit_unavailable
from proxy.gateway.record import RequestRecord
from proxy.gateway.request_log import AuditLogError
from proxy.jobs.ray_engine import RaySettings, WorkerFactory
from proxy.jobs.runner import LineRunner, OnRay, OutputError, answer_key, input_lines
from proxy.protocol.choices import complete, make_job
from proxy.protocol.errors import from_exception, invalid
from proxy.protocol.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

ENDPOINTS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}


class BatchInputError(ValueError):
    """The batch as a whole cannot run (its output belongs to another input, …)."""


@dataclass(frozen=True)
class Request:
    """One valid input line."""

    line: int  # 1-based
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    """An input line that is not a request; answered with an error line."""

    line: int
    custom_id: str | None
    code: str
    message: str


@dataclass
class Summary:
    """Counts of one batch run; ``completed`` lines got a 200, ``failed`` did not."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    skipped: int = 0
    """Lines already answered by an earlier, interrupted run."""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("total", "completed", "failed", "skipped")}


def parse_lines(data: bytes) -> list[Request | BadLine]:
    """Every non-blank input line as a :class:`Request` or a :class:`BadLine`.

    A ``custom_id`` seen on an earlier line makes the later line a
    :class:`BadLine` (``duplicate_custom_id``): OpenAI requires them unique,
    and they key the output.
    """
    out: list[Request | BadLine] = []
    seen: set[str] = set()
    for n, raw in input_lines(data):
        item = _parse_line(n, raw)
        if isinstance(item, Request):
            if item.custom_id in seen:
                item = BadLine(
                    n, item.custom_id, "duplicate_custom_id", f"custom_id {item.custom_id!r} is used on an earlier line"
                )
            else:
                seen.add(item.custom_id)
        out.append(item)
    return out


def _parse_line(n: int, raw: bytes) -> Request | BadLine:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        return BadLine(n, None, "invalid_json", f"line {n} is not JSON: {exc}")
    if not isinstance(obj, dict):
        return BadLine(n, None, "invalid_json", f"line {n} is not a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return BadLine(n, None, "missing_required_parameter", f"line {n}: custom_id must be a non-empty string")
    method, url, body = obj.get("method"), obj.get("url"), obj.get("body")
    if method is None:
        return BadLine(n, cid, "missing_required_parameter", f"line {n}: missing required parameter 'method'")
    if method != "POST":
        return BadLine(n, cid, "invalid_method", f"line {n}: method must be POST (got {method!r})")
    if url is None:
        return BadLine(n, cid, "missing_required_parameter", f"line {n}: missing required parameter 'url'")
    if url not in ENDPOINTS:
        return BadLine(n, cid, "invalid_url", f"line {n}: url must be one of {', '.join(ENDPOINTS)} (got {url!r})")
    if not isinstance(body, dict):
        return BadLine(n, cid, "missing_required_parameter", f"line {n}: body must be a JSON object")
    extra = set(obj) - {"custom_id", "method", "url", "body"}
    if extra:
        return BadLine(n, cid, "invalid_request", f"line {n}: unknown keys {sorted(extra)}")
    return Request(n, cid, url, body)


def _item_key(item: Request | BadLine) -> str:
    """What identifies an input line's answer: a request's custom_id (unique),
    a bad line's line number."""
    return f"id:{item.custom_id}" if isinstance(item, Request) else f"line:{item.line}"


def _output_key(obj: dict[str, Any]) -> str:
    """:func:`_item_key` of the input line an output line answers."""
    return answer_key(obj, "custom_id")


@dataclass
class BatchRunner:
    """Runs batch files against served models in-process (the same path as
    the HTTP routes: validation, :func:`proxy.protocol.choices.make_job`,
    :func:`proxy.protocol.choices.complete`)."""

    models: dict[str, ServedModel]
    settings: ServerConfig = field(default_factory=ServerConfig)
    gateway: Any = None
    """A :class:`proxy.gateway.gateway.Gateway`: each line is then counted and audited like a request."""

    async def answer(self, req: Request, key_id: str | None = None) -> dict[str, Any]:
        """The output line of one request (never raises for a bad request or
        a failed upstream: those are in the line's response); ``key_id``, the client key
        the batch was created with, names the line in the audit log."""
        request_id = f"req_{uuid.uuid4().hex}"
        rec = None
        if self.gateway is not None:
            rec = RequestRecord(request_id, key_id, f"batch {req.url}")
            rec.asked_for(req.body)
        try:
            parsed = ENDPOINTS[req.url].model_validate(req.body)
            if parsed.stream:
                raise invalid("stream: streaming is not supported in batches", "stream")
            job = make_job(parsed, self.models, self.settings)
            if rec is not None:
                rec.set_job(job)
            body = await complete(job)
            status = 200
        except Exception as exc:  # noqa: BLE001 - every failure becomes the line's error response
            err = from_exception(exc)
            status, body = err.status, err.body()
            if rec is not None:
                rec.error = err.code or err.type
        if rec is not None:
            try:
                self.gateway.record(rec, status)
            except AuditLogError as exc:
                log.error("batch line %s: %s", req.custom_id, exc)
                withheld = audit_unavailable()
                status, body = withheld.status, withheld.body()
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": req.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }

    async def run(
        self,
        inp: str | os.PathLike[str],
        out: str | os.PathLike[str],
        *,
        concurrency: int = 4,
        progress: bool = True,
        on_line: Callable[[Summary], None] | None = None,
        ray: tuple[RaySettings, WorkerFactory] | None = None,
        key_id: str | None = None,
        exclusive: bool = False,
    ) -> Summary:
        """Answer every line of ``inp`` not yet in ``out`` and append the answers to ``out``.

        Args:
            concurrency: requests in flight at once (≥ 1).
            progress: show a tqdm bar (rate and ETA) on stderr.
            on_line: called with the running counts after each line is written.
            ray: answer the requests on Ray (:mod:`proxy.jobs.ray_engine`) with these
                settings, each worker a :class:`BatchRunner` built by the factory
                (``proxy.cli.workers.BatchWorker``); bad lines are answered here.
            key_id: the client key the batch was created with (the audit log's ``key_id``).
            exclusive: lock ``out`` while running (another run on it is refused;
                :class:`proxy.jobs.runner.ResumableOutput`); the command line's runs do.

        Raises:
            BatchInputError: ``out`` was written from another input, is not a batch output,
                or (``exclusive``) another run is writing it.
            OSError: ``inp`` cannot be read or ``out`` written.
        """
        from tqdm import tqdm

        if concurrency < 1:
            raise BatchInputError("concurrency must be at least 1")
        started = time.monotonic()
        data = Path(inp).read_bytes()
        items = parse_lines(data)
        runner: LineRunner[Request | BadLine] = LineRunner(
            out, data, item_key=_item_key, line_key=_output_key, exclusive=exclusive
        )
        try:
            # bad lines need no work: they are answered first, in input order
            done = runner.open(sorted(items, key=lambda i: isinstance(i, Request)))
        except OutputError as exc:
            raise BatchInputError(str(exc)) from exc
        ok = sum(_ok(o) for o in done)
        summary = Summary(total=len(items), completed=ok, failed=len(done) - ok, skipped=len(done))

        async def answer(item: Request | BadLine) -> dict[str, Any]:
            return _error_line(item) if isinstance(item, BadLine) else await self.answer(item, key_id)

        def count(line: dict[str, Any]) -> None:
            if _ok(line):
                summary.completed += 1
            else:
                summary.failed += 1
            if on_line is not None:
                on_line(summary)

        try:
            await runner.run(
                answer,
                counts=lambda: {"input": str(inp), **summary.as_dict()},
                bar=tqdm(total=len(items), initial=len(done), unit="req", disable=not progress, desc="batch"),
                concurrency=concurrency,
                on_line=count,
                ray=None if ray is None else OnRay(ray[0], ray[1], payload),
            )
        finally:
            summary.seconds = time.monotonic() - started
        return summary


def payload(item: Request | BadLine) -> dict[str, Any] | None:
    """What a Ray worker answers for an input line (:func:`request_of` reads it back);
    ``None`` for a bad line, answered by the driver."""
    return asdict(item) if isinstance(item, Request) else None


def request_of(payload: dict[str, Any]) -> Request:
    """The :class:`Request` that :func:`payload` wrote."""
    return Request(**payload)


def _ok(line: dict[str, Any]) -> bool:
    return (line.get("response") or {}).get("status_code") == 200


def _error_line(bad: BadLine) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": bad.custom_id,
        "response": None,
        "error": {"code": bad.code, "message": bad.message, "line": bad.line},
    }


def iter_output(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The output lines of a batch run, parsed."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                yield json.loads(raw)
