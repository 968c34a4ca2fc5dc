"""Tokens per second through the proxy vs direct, in one run, on the embedded
default (llama.cpp in-process) and on llama-cpp-python's server.

    python -m bench.tokens_per_second [--tokens 48] [--json FILE]

Greedy, no offset (U = B), so both sides generate the same text; the ratio
is the proxy's overhead (one remote call per token in token mode).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from bench import report

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Why is the sky blue?"]


async def _proxy_tps(model, n_tokens: int) -> tuple[float, int]:
    from proxy.config import ServerConfig
    from proxy.protocol.choices import complete, make_job
    from proxy.protocol.schemas import ChatCompletionRequest, Message

    total, t0 = 0, time.perf_counter()
    for p in PROMPTS:
        req = ChatCompletionRequest(
            model=model.name, messages=[Message(role="user", content=p)], temperature=0, max_tokens=n_tokens
        )
        r = await complete(make_job(req, {model.name: model}, ServerConfig()))
        total += r["usage"]["completion_tokens"]
    return total / (time.perf_counter() - t0), total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import openai
    from conftest import _llama_server

    from adapters.llama_inprocess import LlamaInProcessAdapter
    from proxy.config import ModelConfig, embedded_default
    from proxy.registry import build_model, build_models

    out = {}
    model = build_models(embedded_default())["smollm2-demo"]
    adapter = model.adapter
    if not isinstance(adapter, LlamaInProcessAdapter):
        raise SystemExit(f"the embedded default's remote is {type(adapter).__name__}, not llama.cpp in-process")
    # Direct: the same in-process llama.cpp model (the adapter's context), its own chat completion.
    t0, n = time.perf_counter(), 0
    for p in PROMPTS:
        own: Any = adapter.llama.create_chat_completion(
            messages=[{"role": "user", "content": p}], temperature=0, max_tokens=args.tokens
        )
        n += own["usage"]["completion_tokens"]
    direct_tps = n / (time.perf_counter() - t0)
    proxy_tps, _ = asyncio.run(_proxy_tps(model, args.tokens))
    out["embedded"] = {"direct_tps": direct_tps, "proxy_tps": proxy_tps, "ratio": proxy_tps / direct_tps}

    from proxy.pair.model_files import packaged_gguf

    gen = _llama_server(packaged_gguf("smollm2"), [], "bench_llama_server.log")
    url = next(gen)
    try:
        direct = openai.OpenAI(base_url=url, api_key="none")
        t0, n = time.perf_counter(), 0
        for p in PROMPTS:
            r = direct.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": p}],
                temperature=0,
                max_tokens=args.tokens,
                extra_body={"repeat_penalty": 1.0},
            )
            n += r.usage.completion_tokens if r.usage else 0
        direct_tps = n / (time.perf_counter() - t0)
        remote = build_model(
            "remote",
            ModelConfig(backend="openai-completions", base_url=url, remote_model="smollm2", template="gguf:smollm2"),
        )
        proxy_tps, _ = asyncio.run(_proxy_tps(remote, args.tokens))
        out["llama_server"] = {"direct_tps": direct_tps, "proxy_tps": proxy_tps, "ratio": proxy_tps / direct_tps}
    finally:
        gen.close()
    report(out, args.json)


if __name__ == "__main__":
    main()
