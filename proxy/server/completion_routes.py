"""The completion routes, ``POST /v1/chat/completions`` and ``POST /v1/completions``:
the body is validated, the request's key must allow the model, and the job from
:mod:`proxy.protocol.choices` is answered whole or streamed as server-sent events. An error in
the middle of a stream is sent as ``data: {"error": {...}}`` and the stream ends without
``[DONE]`` (so clients never mistake a truncated answer for a whole one).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from proxy.gateway.keys import check_model
from proxy.gateway.record import RECORD, RequestRecord
from proxy.protocol.bodies import dumps, read_json_body
from proxy.protocol.choices import complete, make_job, stream
from proxy.protocol.errors import from_exception
from proxy.protocol.schemas import ChatCompletionRequest, CompletionRequest
from proxy.server.app_keys import MODELS, SETTINGS
from proxy.server.sse import send_events


async def _serve(
    request: web.Request, schema: type[ChatCompletionRequest] | type[CompletionRequest]
) -> web.StreamResponse:
    body = await read_json_body(request)
    rec: RequestRecord | None = request.get(RECORD)
    if rec is not None:
        rec.asked_for(body)
    try:
        req = schema.model_validate(body)
    except ValidationError as exc:
        raise from_exception(exc) from exc
    check_model(request, req.model)
    settings = request.app[SETTINGS]
    job = make_job(req, request.app[MODELS], settings)
    if rec is not None:
        rec.set_job(job)
        if settings.audit_log_text:
            rec.prompt = [dict(m) for m in job.context.messages] if job.context.messages else job.context.prompt
            rec.output = [""] * job.n
    if not job.stream:
        result = await complete(job)
        if rec is not None and rec.output is not None:
            rec.output = [c["message"]["content"] if job.kind == "chat" else c["text"] for c in result["choices"]]
        return web.Response(text=dumps(result), content_type="application/json")
    # Fail before the headers when the first step already fails (bad settings, upstream down):
    # stream() yields nothing, not even the role chunk, before the first step is decoded.
    chunks = stream(job)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None

    def seen(chunk: dict[str, Any]) -> None:
        if rec is None:
            return
        if rec.first_token is None and chunk["choices"]:
            rec.first_token = time.monotonic()
        if rec.output is not None:
            for c in chunk["choices"]:
                rec.output[c["index"]] += (c.get("delta") or {}).get("content") or c.get("text") or ""

    return await send_events(
        request,
        rec,
        first,
        chunks,
        encode=lambda chunk: f"data: {dumps(chunk)}\n\n".encode(),
        error_item=lambda err: err.body(),
        seen=seen,
        last=b"data: [DONE]\n\n",
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, ChatCompletionRequest)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, CompletionRequest)
