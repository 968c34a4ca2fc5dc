"""The aiohttp server: thin routes over :mod:`proxy.api.choices`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``, OpenAI's Files and Batches endpoints
(:mod:`proxy.api.files_batches`), and for operators ``GET /health`` (the process is
up), ``GET /ready`` (every upstream answers) and ``GET /metrics``
(Prometheus). Keys, limits, request ids, metrics and the audit log:
:mod:`proxy.gateway.gateway`. Every error, also for unknown routes and
oversized bodies, is an OpenAI error body (:mod:`proxy.api.errors`); an error in
the middle of a stream is sent as ``data: {"error": {...}}`` and the stream
ends without ``[DONE]`` (so clients never mistake a truncated answer for a
whole one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from proxy.api.bodies import read_json_body
from proxy.api.choices import complete, make_job, stream
from proxy.api.errors import ProxyError, from_exception
from proxy.api.schemas import ChatCompletionRequest, CompletionRequest
from proxy.config import ServerConfig
from proxy.decoding.decoder import ServedModel
from proxy.gateway.gateway import (
    CLIENT_KEY,
    COMPLETION_ROUTES,
    LIMITED_ROUTES,
    RECORD,
    REQUEST_ID,
    Gateway,
    PairCollector,
    RequestRecord,
    allowed_models,
    audit_unavailable,
    cancelled_at_shutdown,
    check_model,
    find_key,
    log_client_closed,
    new_request_id,
    request_id_var,
)
from proxy.gateway.request_log import AuditLog, AuditLogError

log = logging.getLogger(__name__)

MODELS = web.AppKey("models", dict)
SETTINGS = web.AppKey("settings", ServerConfig)
GATEWAY = web.AppKey("gateway", Gateway)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _dumps(obj: Any) -> str:
    """JSON without NaN/Infinity (they are not JSON)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def error_response(err: ProxyError) -> web.Response:
    resp = web.Response(
        status=err.status, text=_dumps(err.body()), content_type="application/json", headers=err.headers
    )
    if (err.headers or {}).get("Connection") == "close":
        resp.force_close()  # the body could not be read to its end: the connection cannot be reused
    return resp


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, auth, limits, metrics and the audit log (:mod:`proxy.gateway.gateway`).

    Every request to a completion route is counted and audited, refused ones
    (401, 403, 429) included. When its audit line cannot be written, an answer
    not yet sent is withheld (500 ``audit_log_unavailable``): nothing is served
    unrecorded that can still be stopped.
    """
    started = time.monotonic()
    rid = new_request_id(request.headers.get("X-Request-Id"))
    request[REQUEST_ID] = rid
    token = request_id_var.set(rid)
    gw = request.app[GATEWAY]
    rec = None
    if request.method == "POST" and request.path in COMPLETION_ROUTES:
        rec = RequestRecord(rid, None, request.path)
        request[RECORD] = rec
        gw.begin(rec)
    try:
        try:
            if rec is not None and gw.stopping:
                rec.error = "server_shutting_down"
                response: web.StreamResponse = error_response(
                    ProxyError(503, "The server is shutting down", "server_error", None, rec.error)
                )
            else:
                response = await _guarded(request, handler, gw, rec)
        except asyncio.CancelledError:  # the client went away, or the server is stopping
            if rec is not None and gw.stopping and not rec.streamed:
                # our own shutdown cancelled it: the client still gets an answer
                err = cancelled_at_shutdown()
                rec.error = err.code
                gw.finish_quietly(rec, err.status)
                return error_response(err)
            if rec is not None:
                rec.error = rec.error or "client_closed_request"
                gw.finish_quietly(rec, 499)  # nginx's "client closed request"
            if not gw.stopping:
                log_client_closed(request, time.monotonic() - started)
            raise
        except BaseException:
            if rec is not None:
                gw.finish_quietly(rec, 500)
            raise
        if rec is not None:
            try:
                gw.finish(rec, response.status)
            except AuditLogError as exc:
                log.error("request %s: %s", rid, exc)
                if not response.prepared:
                    return error_response(audit_unavailable())
        return response
    finally:
        request_id_var.reset(token)


async def _guarded(
    request: web.Request, handler: Handler, gw: Gateway, rec: RequestRecord | None
) -> web.StreamResponse:
    """Auth and limits around the handler; their refusals as error responses."""
    try:
        key = None
        if gw.settings.keys and request.path.startswith("/v1/"):
            key = find_key(gw.settings, request.headers.get("Authorization"))
            request[CLIENT_KEY] = key
            if rec is not None:
                rec.key_id = key.id
        if key is not None and "*" not in key.models and request.path.startswith(("/v1/files", "/v1/batches")):
            # Files and batches are shared by the keys allowed every model, not owned per key.
            raise ProxyError(
                403,
                'Files and batches need a key allowed to use every model (models = ["*"])',
                "invalid_request_error",
                None,
                "model_not_allowed",
            )
        if request.method != "POST" or request.path not in LIMITED_ROUTES:
            return await handler(request)
        slot = await gw.limits.enter(key)
        try:
            return await handler(request)
        finally:
            gw.limits.leave(slot)
    except ProxyError as err:
        if rec is not None:
            rec.error = err.code or err.type
        return error_response(err)


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
        rec = request.get(RECORD)
        if rec is not None:
            rec.error = err.code or err.type
        return error_response(err)


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
        return web.Response(text=_dumps(result), content_type="application/json")
    # Fail before the headers when the first step already fails (bad settings, upstream down):
    # stream() yields nothing, not even the role chunk, before the first step is decoded.
    chunks = stream(job)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    if rec is not None:
        rec.streamed = True
    await response.prepare(request)

    def seen(chunk: dict[str, Any]) -> None:
        if rec is None:
            return
        if rec.first_token is None and chunk["choices"]:
            rec.first_token = time.monotonic()
        if rec.output is not None:
            for c in chunk["choices"]:
                rec.output[c["index"]] += (c.get("delta") or {}).get("content") or c.get("text") or ""

    try:
        if first is not None:
            seen(first)
            await response.write(f"data: {_dumps(first)}\n\n".encode())
        async for chunk in chunks:
            seen(chunk)
            await response.write(f"data: {_dumps(chunk)}\n\n".encode())
    except (ConnectionResetError, ConnectionError):
        await chunks.aclose()
        if rec is not None:
            rec.error = "client_closed_request"
        return response
    except asyncio.CancelledError:
        # The server is stopping (or the client left): end the stream with an error event, not a bare cut.
        err = cancelled_at_shutdown()
        if rec is not None:
            rec.error = err.code
        with contextlib.suppress(Exception):
            await response.write(f"data: {_dumps(err.body())}\n\n".encode())
            await response.write_eof()
        raise
    except Exception as exc:
        err = from_exception(exc)
        if rec is not None:
            rec.error = err.code or err.type
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
    data = [_model_card(name) for name in allowed_models(request, request.app[MODELS])]
    return web.Response(text=_dumps({"object": "list", "data": data}), content_type="application/json")


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in allowed_models(request, request.app[MODELS]):
        raise ProxyError(404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found")
    return web.Response(text=_dumps(_model_card(name)), content_type="application/json")


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "deltaproxy"}


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.Response(text=_dumps({"status": "ok"}), content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """Readiness: every model is loaded and its upstream answers within
    ``server.ready_timeout`` (:meth:`adapters.base.RemoteAdapter.check`);
    503 with the reason per model otherwise."""
    timeout = request.app[SETTINGS].ready_timeout

    async def one(model: ServedModel) -> str:
        try:
            await asyncio.wait_for(model.adapter.check(), timeout)
        except TimeoutError:
            return f"the upstream did not answer within {timeout:g} s"
        except Exception as exc:
            return str(from_exception(exc).message)
        return "ok"

    models = request.app[MODELS]
    states = dict(zip(models, await asyncio.gather(*(one(m) for m in models.values())), strict=True))
    ok = all(v == "ok" for v in states.values())
    body = {"status": "ready" if ok else "not_ready", "models": states}
    return web.Response(status=200 if ok else 503, text=_dumps(body), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[GATEWAY].metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(REQUEST_ID)
    if rid:
        response.headers["X-Request-Id"] = rid


def create_app(
    models: dict[str, ServedModel],
    settings: ServerConfig | None = None,
    *,
    close_models: bool = True,
    batches: bool = True,
) -> web.Application:
    """The app; with ``close_models`` its cleanup closes the models' adapters and pair threads;
    with ``batches`` it serves the Files and Batches endpoints (:mod:`proxy.api.files_batches`)."""
    settings = settings or ServerConfig()
    app = web.Application(middlewares=[gateway_middleware, errors_middleware], client_max_size=settings.max_body_bytes)
    app[MODELS] = models
    app[SETTINGS] = settings
    # The audit log opens now, so that a bad path or a log held by another server fails the start.
    gateway = Gateway(
        settings, audit=AuditLog(settings.audit_log) if settings.audit_log else None, models=frozenset(models)
    )
    app[GATEWAY] = gateway
    gateway.metrics.registry.register(PairCollector(models))
    app.on_response_prepare.append(_request_id_header)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    if batches:
        from proxy.api.files_batches import add_batch_routes
        from proxy.common.files import cache_dir
        from proxy.jobs.batch import BatchRunner

        folder = Path(settings.data_dir) if settings.data_dir else cache_dir() / "server"
        add_batch_routes(app, BatchRunner(models, settings, gateway), folder, settings.max_file_bytes)

    async def _close_models(app: web.Application) -> None:
        for model in app[MODELS].values():
            await model.aclose()

    if close_models:
        app.on_cleanup.append(_close_models)

    async def _graceful(app: web.Application) -> None:
        await gateway.shutdown(settings.shutdown_timeout)

    app.on_shutdown.append(_graceful)

    async def _close_audit(app: web.Application) -> None:
        # Requests cancelled at shutdown still write their lines: wait for them (bounded).
        await gateway.drain(timeout=10.0)
        if gateway.audit is not None:
            gateway.audit.close()

    app.on_cleanup.append(_close_audit)
    return app
