"""A loopback chat endpoint with a hosted API's capabilities cut out, in front of a real
raw-completions server (llama-cpp-python's on the packaged SmolLM2, or vLLM's): what the strategy tests
and ``bench.providers`` put behind the proxy to serve each capability class as its providers
behave.

    python -m bench.capability_shim --upstream http://127.0.0.1:8081/v1 [--no-logprobs] [--no-prefill] [--no-n]

``POST /v1/chat/completions`` renders the chat template (the GGUF's own) and asks the
upstream's ``/v1/completions``; the answer comes back in chat's shape, with ``logprobs.content``
entries as OpenAI sends them. A trailing assistant message is continued (llama.cpp's and
Groq's way) or, with ``--no-prefill``, answered as a new turn (OpenAI's). With
``--no-logprobs`` a request asking for ``logprobs`` gets the 400 that Groq and OpenAI's
reasoning models answer; with ``--no-n``, ``n`` > 1 gets Groq's 400. ``GET /v1/models``
passes through; ``GET /stats`` counts calls and refusals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from aiohttp import web

from adapters.templates import ChatTemplate

STATS: web.AppKey[Counter[str]] = web.AppKey("stats", Counter)


@dataclass(frozen=True)
class Cut:
    """What the endpoint can do."""

    logprobs: bool = True
    prefill: bool = True
    n: bool = True


def _error(status: int, message: str, param: str | None, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return web.json_response(body, status=status)


def make_app(
    upstream: str, template: ChatTemplate, cut: Cut, model: str = "smollm2", upstream_model: str | None = None
) -> web.Application:
    """The shim's app: chat requests rendered with ``template`` and sent to ``upstream``'s
    ``/v1/completions`` (as ``upstream_model`` where the upstream serves it by name, as vLLM
    does), with the capabilities ``cut`` leaves."""
    stats: Counter[str] = Counter()
    app = web.Application()
    client = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=600)

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        stats["calls"] += 1
        if body.get("logprobs") and not cut.logprobs:
            stats["refused_logprobs"] += 1
            return _error(400, "logprobs is not supported with this model", "logprobs", "unsupported_parameter")
        if (body.get("n") or 1) > 1 and not cut.n:
            stats["refused_n"] += 1
            return _error(400, "'n' : number must be at most 1", "n", "invalid_value")
        messages = list(body["messages"])
        prefix = ""
        if messages and messages[-1]["role"] == "assistant" and cut.prefill:
            prefix = messages.pop()["content"]
            stats["continued"] += 1
        prompt = template.render(messages, add_generation_prompt=True) + prefix
        req: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": body.get("max_tokens") or body.get("max_completion_tokens") or 16,
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
        }
        if upstream_model is not None:
            req["model"] = upstream_model
        for key in ("stop", "seed", "top_k", "min_p", "repeat_penalty"):
            if body.get(key) is not None:
                req[key] = body[key]
        if body.get("logprobs"):
            req["logprobs"] = max(1, int(body.get("top_logprobs") or 1))
        r = await client.post("/completions", json=req)
        if r.status_code != 200:
            return web.Response(status=r.status_code, body=r.content, content_type="application/json")
        out = r.json()
        choice = out["choices"][0]
        message: dict[str, Any] = {"role": "assistant", "content": choice["text"]}
        result: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": choice.get("finish_reason") or "stop",
            "logprobs": None,
        }
        lp = choice.get("logprobs")
        if body.get("logprobs") and lp:
            k = int(body.get("top_logprobs") or 0)
            content = []
            for i, token in enumerate(lp["tokens"]):
                tops = (lp.get("top_logprobs") or [])[i] or {}
                content.append(
                    {
                        "token": token,
                        "logprob": lp["token_logprobs"][i],
                        "bytes": None,
                        "top_logprobs": [
                            {"token": t, "logprob": v, "bytes": None}
                            for t, v in sorted(tops.items(), key=lambda kv: -kv[1])[:k]
                        ],
                    }
                )
            result["logprobs"] = {"content": content}
        return web.json_response(
            {
                "id": out.get("id", "chatcmpl-shim"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", model),
                "choices": [result],
                "usage": out.get("usage"),
            }
        )

    async def models(request: web.Request) -> web.Response:
        r = await client.get("/models")
        return web.Response(status=r.status_code, body=r.content, content_type="application/json")

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(dict(stats))

    async def close(app: web.Application) -> None:
        await client.aclose()

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", get_stats)
    app.on_cleanup.append(close)
    app[STATS] = stats
    return app


def smollm2_template() -> ChatTemplate:
    """The packaged SmolLM2 GGUF's own chat template."""
    from proxy.registry import _template

    template = _template("gguf:smollm2")
    assert template is not None
    return template


@contextlib.asynccontextmanager
async def running(
    upstream: str, cut: Cut, template: ChatTemplate | None = None, upstream_model: str | None = None
) -> AsyncIterator[tuple[str, Counter[str]]]:
    """The shim on a free loopback port: yields its ``/v1`` base URL and its counters."""
    app = make_app(upstream, template or smollm2_template(), cut, upstream_model=upstream_model)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1", app[STATS]
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="a raw-completions server's /v1 URL")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--no-logprobs", action="store_true")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--no-n", action="store_true")
    args = ap.parse_args()
    cut = Cut(logprobs=not args.no_logprobs, prefill=not args.no_prefill, n=not args.no_n)

    async def serve() -> None:
        app = make_app(args.upstream, smollm2_template(), cut)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"base_url: http://127.0.0.1:{port}/v1", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
