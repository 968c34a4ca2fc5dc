"""``POST /v1/responses`` (OpenAI's Responses API, :mod:`proxy.protocol.responses`): validated,
decoded as a chat job, answered as a ``response`` object or streamed as typed server-sent
events (``event: response.output_text.delta`` …). A failure before the first event is an error
status with OpenAI's error body; one after it is an ``error`` event, and the stream ends
without ``response.completed`` (so that a client never takes a truncated answer for a whole one).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from proxy.gateway.keys import check_model
from proxy.gateway.record import RECORD, RequestRecord
from proxy.protocol.bodies import dumps, read_json_body
from proxy.protocol.choices import make_job
from proxy.protocol.errors import ProxyError, from_exception
from proxy.protocol.responses import ResponsesRequest, respond, respond_stream
from proxy.server.app_keys import MODELS, SETTINGS
from proxy.server.sse import send_events

#: Chat's names for the fields a Responses request names otherwise (in error messages).
_RENAMED = {"max_completion_tokens": "max_output_tokens", "messages": "input", "logprobs": "include"}


def _renamed(err: ProxyError) -> ProxyError:
    """``err`` as the Responses API names its fields: the leading ``field:`` of its message and its param."""
    message = err.message
    head, sep, rest = message.partition(": ")
    if sep and head in _RENAMED:
        message = f"{_RENAMED[head]}: {rest}"
    return replace(err, message=message, param=_RENAMED.get(err.param or "", err.param))


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


async def responses(request: web.Request) -> web.StreamResponse:
    body = await read_json_body(request)
    rec: RequestRecord | None = request.get(RECORD)
    if rec is not None:
        rec.asked_for(body)
    try:
        req = ResponsesRequest.model_validate(body)
        chat = req.chat_request()
    except ValidationError as exc:
        raise _renamed(from_exception(exc)) from exc
    check_model(request, req.model)
    settings = request.app[SETTINGS]
    try:
        job = make_job(chat, request.app[MODELS], settings)
    except ProxyError as exc:
        raise _renamed(exc) from exc
    if rec is not None:
        rec.set_job(job)
        if settings.audit_log_text:
            rec.prompt = [dict(m) for m in job.context.messages or ()]
            rec.output = [""]
    if not req.stream:
        try:
            result = await respond(job, req)
        except Exception as exc:
            raise _renamed(from_exception(exc)) from exc
        if rec is not None and rec.output is not None:
            rec.output = [_output_text(result)]
        return web.Response(text=dumps(result), content_type="application/json")
    events = respond_stream(job, req)
    try:
        first = await anext(events)  # fails before the headers when the first step fails
    except Exception as exc:
        raise _renamed(from_exception(exc)) from exc
    seq = first["sequence_number"]

    def seen(event: dict[str, Any]) -> None:
        nonlocal seq
        seq = event["sequence_number"]
        if rec is None:
            return
        if rec.first_token is None and event["type"].endswith(".delta"):
            rec.first_token = time.monotonic()
        if rec.output is not None and event["type"] in ("response.output_text.delta", "response.refusal.delta"):
            rec.output[0] += event["delta"]

    def error_event(err: ProxyError) -> dict[str, Any]:
        return {"type": "error", "code": err.code, "message": err.message, "param": err.param, "sequence_number": seq + 1}

    return await send_events(
        request,
        rec,
        first,
        events,
        encode=_sse,
        error_item=error_event,
        seen=seen,
        map_error=lambda exc: _renamed(from_exception(exc)),
    )


def _output_text(result: dict[str, Any]) -> str:
    parts = [p for item in result["output"] for p in item.get("content", [])]
    return "".join(p.get("text") or p.get("refusal") or "" for p in parts)
