"""The aiohttp server: thin routes over :mod:`proxy.serving`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``, ``GET /health``, and OpenAI's Files and Batches endpoints
(:mod:`proxy.batch_api`). Every error, also for unknown routes and
oversized bodies, is an OpenAI error body (:mod:`proxy.errors`); an error in
the middle of a stream is sent as ``data: {"error": {...}}`` and the stream
ends without ``[DONE]`` (so clients never mistake a truncated answer for a
whole one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from pydantic import ValidationError

from .config import ServerConfig
from .decoding import ServedModel
from .errors import ProxyError, from_exception, invalid
from .protocol import ChatCompletionRequest, CompletionRequest
from .serving import complete, make_job, stream

log = logging.getLogger(__name__)

MODELS = web.AppKey("models", dict)
SETTINGS = web.AppKey("settings", ServerConfig)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _dumps(obj: Any) -> str:
    """JSON without NaN/Infinity (they are not JSON)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def error_response(err: ProxyError) -> web.Response:
    return web.Response(status=err.status, text=_dumps(err.body()), content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        message = {404: f"Unknown route {request.method} {request.path}", 413: "request body is too large"}.get(
            exc.status, exc.reason
        )
        return error_response(ProxyError(exc.status, message, "invalid_request_error", None, code))
    except Exception as exc:
        err = from_exception(exc)
        if err.status >= 500:
            log.error("request %s %s failed: %s", request.method, request.path, exc, exc_info=err.status == 500)
        return error_response(err)


async def read_json_body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ProxyError(413, "request body is too large", "invalid_request_error", None, "request_too_large") from exc
    except (
        HttpProcessingError,
        RequestPayloadError,
    ) as exc:  # e.g. Content-Encoding: gzip over a body that is not gzip
        raise invalid(f"could not read the request body: {str(exc).strip()}", None, "invalid_body") from exc
    except ConnectionError as exc:  # the client went away while sending
        raise invalid("the request body was cut off", None, "invalid_body") from exc
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise invalid("the JSON body is nested too deeply", None, "invalid_json") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise invalid(f"We could not parse the JSON body of your request: {exc}", None, "invalid_json") from exc
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object", None, "invalid_json")
    return body


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


async def _serve(
    request: web.Request, schema: type[ChatCompletionRequest] | type[CompletionRequest]
) -> web.StreamResponse:
    body = await read_json_body(request)
    try:
        req = schema.model_validate(body)
    except ValidationError as exc:
        raise from_exception(exc) from exc
    settings = request.app[SETTINGS]
    job = make_job(req, request.app[MODELS], settings)
    if not job.stream:
        result = await complete(job)
        return web.Response(text=_dumps(result), content_type="application/json")
    # Fail before the headers when the first step already fails (bad settings, upstream down):
    # stream() yields nothing, not even the role chunk, before the first step is decoded.
    chunks = stream(job)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        if first is not None:
            await response.write(f"data: {_dumps(first)}\n\n".encode())
        async for chunk in chunks:
            await response.write(f"data: {_dumps(chunk)}\n\n".encode())
    except (ConnectionResetError, ConnectionError):
        await chunks.aclose()
        return response
    except Exception as exc:
        err = from_exception(exc)
        log.error("stream %s failed mid-way: %s", job.id, exc)
        await response.write(f"data: {_dumps(err.body())}\n\n".encode())
        await response.write_eof()
        return response
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, ChatCompletionRequest)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, CompletionRequest)


async def list_models(request: web.Request) -> web.Response:
    data = [_model_card(name) for name in request.app[MODELS]]
    return web.Response(text=_dumps({"object": "list", "data": data}), content_type="application/json")


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in request.app[MODELS]:
        raise ProxyError(404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found")
    return web.Response(text=_dumps(_model_card(name)), content_type="application/json")


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "deltaproxy"}


async def health(request: web.Request) -> web.Response:
    return web.Response(text=_dumps({"status": "ok"}), content_type="application/json")


def create_app(
    models: dict[str, ServedModel],
    settings: ServerConfig | None = None,
    *,
    close_models: bool = True,
    batches: bool = True,
) -> web.Application:
    """The app; with ``close_models`` its cleanup closes the models' adapters and pair threads;
    with ``batches`` it serves the Files and Batches endpoints (:mod:`proxy.batch_api`)."""
    settings = settings or ServerConfig()
    app = web.Application(middlewares=[errors_middleware], client_max_size=settings.max_body_bytes)
    app[MODELS] = models
    app[SETTINGS] = settings
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
    app.router.add_get("/health", health)
    if batches:
        from .batch import BatchRunner
        from .batch_api import add_batch_routes
        from .models import cache_dir

        folder = Path(settings.data_dir) if settings.data_dir else cache_dir() / "server"
        add_batch_routes(app, BatchRunner(models, settings), folder, settings.max_file_bytes)

    async def _close_models(app: web.Application) -> None:
        for model in app[MODELS].values():
            await model.aclose()

    if close_models:
        app.on_cleanup.append(_close_models)
    return app
