"""The routes that describe the server: ``GET /v1/models`` and ``GET /v1/models/{model}``
(the models the request's key may use), and for operators ``GET /health`` (the process is
up), ``GET /ready`` (every upstream answers) and ``GET /metrics`` (Prometheus,
:mod:`proxy.gateway.prometheus`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.decoding.served import ServedModel
from proxy.gateway.keys import allowed_models
from proxy.protocol.bodies import dumps
from proxy.protocol.errors import ProxyError, from_exception
from proxy.server.app_keys import GATEWAY, MODELS, SETTINGS
from proxy.server.files_batches import BATCHES


async def list_models(request: web.Request) -> web.Response:
    data = [_model_card(name) for name in allowed_models(request, request.app[MODELS])]
    return web.Response(text=dumps({"object": "list", "data": data}), content_type="application/json")


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in allowed_models(request, request.app[MODELS]):
        raise ProxyError(404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found")
    return web.Response(text=dumps(_model_card(name)), content_type="application/json")


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "deltaproxy"}


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.Response(text=dumps({"status": "ok"}), content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """Readiness: every model is loaded and its upstream answers within
    ``server.ready_timeout`` (:meth:`adapters.base.RemoteAdapter.check`), and the
    rate-limit storage answers where it is Redis (``server.limits_storage``);
    503 with the reason per model (and ``limits_storage``) otherwise."""
    timeout = request.app[SETTINGS].ready_timeout

    async def one(model: ServedModel) -> str:
        try:
            await asyncio.wait_for(model.adapter.check(), timeout)
        except TimeoutError:
            return f"the upstream did not answer within {timeout:g} s"
        except Exception as exc:
            return str(from_exception(exc).message)
        return "ok"

    async def limits() -> str:
        try:
            await asyncio.wait_for(request.app[GATEWAY].limits.check(), timeout)
        except TimeoutError:
            return f"the rate-limit storage did not answer within {timeout:g} s"
        except Exception as exc:
            return str(exc)
        return "ok"

    async def batches() -> str:
        try:
            store = request.app[BATCHES].store
            await asyncio.wait_for(asyncio.to_thread(getattr(store, "check", lambda: None)), timeout)
        except TimeoutError:
            return f"the batch storage did not answer within {timeout:g} s"
        except RuntimeError as exc:  # data_dir is not the shared one
            return str(exc)
        except Exception as exc:
            return f"the batch storage does not answer: {exc}"
        return "ok"

    models = request.app[MODELS]
    states = dict(zip(models, await asyncio.gather(*(one(m) for m in models.values())), strict=True))
    body: dict[str, object] = {"status": "ready", "models": states}
    if request.app[SETTINGS].limits_storage is not None:
        body["limits_storage"] = await limits()
    if request.app[SETTINGS].batch_storage is not None and BATCHES in request.app:
        body["batch_storage"] = await batches()
    ok = all(v == "ok" for v in states.values()) and all(
        body.get(k, "ok") == "ok" for k in ("limits_storage", "batch_storage")
    )
    body["status"] = "ready" if ok else "not_ready"
    return web.Response(status=200 if ok else 503, text=dumps(body), content_type="application/json")


async def prometheus_metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[GATEWAY].metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})
