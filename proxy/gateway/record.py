"""One request as the gateway sees it: its id and, for a completion request, the
:class:`RequestRecord` that metrics and the request log are written from.

* **Request id**: ``X-Request-Id`` from the client when it is a plain token
  (letters, digits, ``._-``, at most 128), else a new ``req_<hex>``
  (:func:`new_request_id`); returned in the same header on every response and
  carried by every log line of the request (:mod:`proxy.gateway.logs`).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

REQUEST_ID = web.RequestKey("request_id", str)


def new_request_id(header: str | None) -> str:
    if header and _REQUEST_ID_RE.match(header):
        return header
    return f"req_{uuid.uuid4().hex}"


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
    """The request's :class:`proxy.protocol.choices.Job`, once it is validated."""
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
        """Take model, α and offset from the validated :class:`proxy.protocol.choices.Job`."""
        self.job, self.model, self.alpha = job, job.model.name, job.params.alpha
        self.offset_sha256 = job.model.offset_sha256 if job.model.uses_offset else None

    @property
    def stats(self) -> list[Any]:
        """The job's :class:`proxy.decoding.types.ChoiceStats`, one per choice."""
        return list(self.job.stats) if self.job is not None else []


RECORD = web.RequestKey("record", RequestRecord)
"""The :class:`RequestRecord` of a completion request."""
