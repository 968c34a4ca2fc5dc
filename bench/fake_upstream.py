"""A fast, deterministic OpenAI-compatible upstream on loopback, with fault
injection: what the load test and the speed benchmark put behind the proxy so
that the proxy, not a model, is measured.

    python -m bench.fake_upstream [--port 0] [--fault-rate 0.1] [--seed 0] [--delay 0] [--repeat 1]

Prints ``base_url: http://127.0.0.1:PORT/v1`` once it listens.

``POST /v1/chat/completions`` answers with the tokens of :data:`TEXT`
(``--repeat`` times over, for longer answers), each
with ``logprobs`` and ``top_logprobs`` (the bytes included), continuing a
final assistant message the way vLLM does (``continue_final_message``) or
llama.cpp does (a final assistant message is continued); after the text it
ends the turn (``<|im_end|>``, ``finish_reason: "stop"``); with ``stream: true`` as vLLM
streams it (a chunk per token, the usage where ``stream_options`` asks). ``POST /tokenize``
counts a prompt as the usage does. ``GET /v1/models`` lists ``fake``. ``GET /stats`` returns the call and fault counters.

With ``--fault-rate r`` a fraction r of the calls fail, chosen by a seeded
generator, in turn as: HTTP 500; HTTP 503 with ``Retry-After: 0``; HTTP 429
with ``Retry-After: 0``; a connection dropped before any answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
from collections import Counter
from typing import Any

from aiohttp import web

#: The answer, token by token; any request gets it (continued from where its
#: assistant prefix stops).
TEXT = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")
EOT = "<|im_end|>"
ALTERNATIVES = (" cat", " red", " and", " a", ",", " slow", " big", " old", " fast", " one")
FAULTS = ("http_500", "http_503", "http_429", "drop")

STATS: web.AppKey[Counter[str]] = web.AppKey("stats", Counter)
RNG = web.AppKey("rng", random.Random)
FAULT_RATE = web.AppKey("fault_rate", float)
DELAY = web.AppKey("delay", float)
ANSWER = web.AppKey("answer", tuple)


def next_index(prefix: str, answer: tuple[str, ...] = TEXT) -> int:
    """How many tokens of ``answer`` the assistant prefix already holds."""
    text = ""
    for i, tok in enumerate(answer):
        if text == prefix:
            return i
        text += tok
    return len(answer) if text == prefix else len(prefix) % len(answer)


def _entry(token: str, logprob: float, top_k: int, position: int) -> dict[str, Any]:
    tops = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
    rest = (1 - math.exp(logprob)) / max(1, top_k - 1)
    for j in range(top_k - 1):
        alt = ALTERNATIVES[(position + j) % len(ALTERNATIVES)]
        if alt != token:
            tops.append({"token": alt, "logprob": math.log(rest), "bytes": list(alt.encode())})
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": tops[:top_k]}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS]
    stats["calls"] += 1
    if request.app[FAULT_RATE] and request.app[RNG].random() < request.app[FAULT_RATE]:
        kind = FAULTS[stats["faults"] % len(FAULTS)]
        stats["faults"] += 1
        stats[kind] += 1
        if kind == "drop":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # the connection is gone; aiohttp drops the handler
        status = {"http_500": 500, "http_503": 503, "http_429": 429}[kind]
        body = {"error": {"message": f"injected {kind}", "type": "server_error", "param": None, "code": None}}
        headers = {"Retry-After": "0"} if status != 500 else None
        return web.json_response(body, status=status, headers=headers)
    if request.app[DELAY]:
        await asyncio.sleep(request.app[DELAY])
    body = await request.json()
    messages = body.get("messages") or []
    prefix = ""
    if messages and messages[-1].get("role") == "assistant":
        prefix = str(messages[-1].get("content") or "")
    answer = request.app[ANSWER]
    start = next_index(prefix, answer)
    n = max(1, int(body.get("max_tokens") or 16))
    top_k = int(body.get("top_logprobs") or 0)
    content, text = [], ""
    finish = "length"
    for pos in range(start, start + n):
        if pos >= len(answer):  # the turn ends (with no token when it ends at once)
            finish = "stop"
            break
        tok = answer[pos]
        content.append(_entry(tok, math.log(0.9), max(1, top_k), pos))
        text += tok
    stats["tokens"] += len(content)
    if body.get("stream"):
        return await _stream(request, body, content, finish)
    return web.json_response(
        {
            "id": f"chatcmpl-fake-{stats['calls']}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": {"content": content} if body.get("logprobs") else None,
                    "finish_reason": finish,
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": len(content), "total_tokens": 12 + len(content)},
        }
    )


async def _stream(
    request: web.Request, body: dict[str, Any], content: list[dict[str, Any]], finish: str
) -> web.StreamResponse:
    """The answer as vLLM streams it: a ``chat.completion.chunk`` per token with its logprobs,
    the finish reason, the usage in a last chunk without choices where asked, then ``[DONE]``.
    A client that goes away ends it."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    head = {"id": f"chatcmpl-fake-{request.app[STATS]['calls']}", "object": "chat.completion.chunk", "created": 0}
    head["model"] = body.get("model", "fake")
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"content": e["token"]}, "logprobs": {"content": [e]}}]}
        for e in content
    ]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        n = len(content)
        usage = {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}
        chunks.append({**head, "choices": [], "usage": usage})
    try:
        for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:  # the client closed the stream (a replaced token)
        pass
    return response


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /tokenize``: the count a completion's usage reports (12)."""
    return web.json_response({"count": 12, "max_model_len": 2048, "tokens": list(range(12))})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "bench"}]})


async def stats(request: web.Request) -> web.Response:
    counts: Counter[str] = request.app[STATS]
    return web.json_response(dict(counts))


def create_app(fault_rate: float = 0.0, seed: int = 0, delay: float = 0.0, repeat: int = 1) -> web.Application:
    """The fake upstream; ``fault_rate`` in [0, 1]; ``delay``: seconds before each answer;
    ``repeat``: how many times :data:`TEXT` makes one answer."""
    if not 0 <= fault_rate <= 1:
        raise ValueError("fault_rate must be in [0, 1]")
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    app = web.Application()
    app[ANSWER] = TEXT * repeat
    app[STATS] = Counter()
    app[RNG] = random.Random(seed)
    app[FAULT_RATE] = fault_rate
    app[DELAY] = delay
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    return app


async def _main(args: argparse.Namespace) -> None:
    runner = web.AppRunner(create_app(args.fault_rate, args.seed, args.delay, args.repeat), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"base_url: http://127.0.0.1:{port}/v1", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fake_upstream", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each answer (a slow upstream)")
    p.add_argument("--repeat", type=int, default=1, help="the answer is the fixed text this many times over")
    args = p.parse_args()
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
