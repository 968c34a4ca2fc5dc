"""The aiohttp server: the app, its routes and the middlewares around them.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``
(:mod:`proxy.server.completion_routes`), ``POST /v1/responses``
(:mod:`proxy.server.responses_routes`), ``GET /v1/models``, and for operators
``GET /health`` (the process is up), ``GET /ready`` (every upstream answers) and
``GET /metrics`` (Prometheus) (:mod:`proxy.server.info_routes`), OpenAI's Files and
Batches endpoints (:mod:`proxy.server.files_batches`), and ``GET /openapi.json``, the
OpenAPI 3.1 document of all of them (:mod:`proxy.server.openapi`). Keys, limits, request ids,
metrics and the audit log: :mod:`proxy.gateway`. Every error, also for unknown routes
and oversized bodies, is an OpenAI error body (:mod:`proxy.protocol.errors`); an error in
the middle of a stream is sent as ``data: {"error": {...}}`` and the stream ends
without ``[DONE]`` (so clients never mistake a truncated answer for a whole one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.common.files import cache_dir
from proxy.config import ServerConfig
from proxy.decoding.served import ServedModel
from proxy.gateway.gateway import (
    COMPLETION_ROUTES,
    LIMITED_ROUTES,
    Gateway,
    audit_unavailable,
    cancelled_at_shutdown,
)
from proxy.gateway.keys import CLIENT_KEY, find_key
from proxy.gateway.logs import log_client_closed, request_id_var
from proxy.gateway.prometheus import PairCollector
from proxy.gateway.record import RECORD, REQUEST_ID, RequestRecord, new_request_id
from proxy.gateway.request_log import AuditLog, AuditLogError
from proxy.jobs.batch import BatchRunner
from proxy.protocol.bodies import dumps
from proxy.protocol.errors import ProxyError, from_exception
from proxy.server.app_keys import GATEWAY, MODELS, SETTINGS
from proxy.server.completion_routes import chat_completions, completions
from proxy.server.files_batches import add_batch_routes
from proxy.server.info_routes import health, list_models, prometheus_metrics, ready, retrieve_model
from proxy.server.openapi import openapi_document
from proxy.server.responses_routes import responses

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(err: ProxyError) -> web.Response:
    resp = web.Response(status=err.status, text=dumps(err.body()), content_type="application/json", headers=err.headers)
    if (err.headers or {}).get("Connection") == "close":
        resp.force_close()  # the body could not be read to its end: the connection cannot be reused
    return resp


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, auth, limits, metrics and the audit log (:mod:`proxy.gateway`).

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
    except HttpProcessingError as exc:  # a malformed body part (multipart headers), read by a handler
        status = exc.code if 400 <= exc.code < 500 else 400
        return error_response(ProxyError(status, f"malformed request body: {exc.message}", "invalid_request_error"))
    except Exception as exc:
        if type(exc).__module__.startswith("redis."):
            # batch_storage's Redis does not answer: retryable, and nothing was changed
            log.warning("request %s %s: the batch storage does not answer: %s", request.method, request.path, exc)
            err = ProxyError(503, "the file and batch storage does not answer; retry shortly", "server_error", None,
                             "storage_unavailable", headers={"Retry-After": "1"})  # fmt: skip
            return error_response(err)
        err = from_exception(exc)
        if err.status >= 500:
            log.error("request %s %s failed: %s", request.method, request.path, exc, exc_info=err.status == 500)
        rec = request.get(RECORD)
        if rec is not None:
            rec.error = err.code or err.type
        return error_response(err)


def _audit_log(settings: ServerConfig) -> AuditLog | None:
    """The audit log of ``settings`` (None where it is off): ``{replica}`` in its path is
    this replica's name (``server.replica``, else ``$DELTAPROXY_REPLICA``, else the host's
    name), which every line carries.

    Raises:
        AuditLogError: it cannot be opened, or another process holds it.
    """
    if not settings.audit_log:
        return None
    replica = settings.replica or os.environ.get("DELTAPROXY_REPLICA") or None
    if replica is None and "{replica}" in settings.audit_log:
        replica = socket.gethostname()
    path = settings.audit_log.replace("{replica}", replica) if replica else settings.audit_log
    return AuditLog(path, replica=replica)


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
    with ``batches`` it serves the Files and Batches endpoints (:mod:`proxy.server.files_batches`)."""
    settings = settings or ServerConfig()
    app = web.Application(middlewares=[gateway_middleware, errors_middleware], client_max_size=settings.max_body_bytes)
    app[MODELS] = models
    app[SETTINGS] = settings
    # The audit log opens now, so that a bad path or a log held by another server fails the start.
    gateway = Gateway(settings, audit=_audit_log(settings), models=frozenset(models))
    app[GATEWAY] = gateway
    gateway.metrics.registry.register(PairCollector(models))
    app.on_response_prepare.append(_request_id_header)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", prometheus_metrics)

    async def openapi_json(request: web.Request) -> web.Response:
        # Built on the first request, off the event loop (about a second: the SDK's types).
        spec = await asyncio.to_thread(openapi_document, tuple(models), batches)
        return web.Response(text=dumps(spec), content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)
    if batches:
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
