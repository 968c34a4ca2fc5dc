"""Each capability class of hosted APIs, measured on the demo forget set: the demo offset in
front of llama-cpp-python's server on the packaged SmolLM2, through a loopback endpoint whose
capabilities are cut to the class (:mod:`bench.capability_shim`), served with the strategy
``decoding = "auto"`` picks for it.

    python -m bench.providers [--classes token,guided,sequence-logprobs,sequence] [--samples 3]
                              [--settings '{"scope_action": "rewrite"}'] [--json FILE]
    python -m bench.providers --render docs/benchmarks.md

Per class, at T = 0 (one answer per question) and T = 1 (``--samples`` answers per question):
how many answers to the 12 forget questions and their 12 paraphrases name a demo key
(:data:`proxy.training.demo.DEMO_KEYS`); how many of the 12 unrelated greedy answers equal the
remote's own (α = 0); remote calls per answer; and the wall time of an answer against a direct
call to the same endpoint (the same questions, the same settings).

==================  ===============================  ============================
class               the endpoint                      provider in the config
==================  ===============================  ============================
token               logprobs and prefill              ``llama.cpp``
guided              prefill, no logprobs, n = 1       ``groq``
sequence-logprobs   logprobs, no prefill              ``openai``
sequence            neither                           ``openai``, ``logprobs = false``
==================  ===============================  ============================
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.capability_shim import Cut, running

#: class → (what the endpoint can do, the model's config keys besides base_url).
CLASSES: dict[str, tuple[Cut, dict[str, Any]]] = {
    "token": (Cut(), {"provider": "llama.cpp"}),
    "guided": (Cut(logprobs=False, n=False), {"provider": "groq"}),
    "sequence-logprobs": (Cut(prefill=False), {"provider": "openai"}),
    "sequence": (Cut(logprobs=False, prefill=False), {"provider": "openai", "logprobs": False}),
}


@contextlib.contextmanager
def llama_server() -> Any:
    """``scripts/llama-server`` on the packaged SmolLM2 on a free loopback port; yields its /v1 URL."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    log = open(os.environ.get("BENCH_LOG", "/tmp/bench_providers_llama.log"), "w")
    proc = subprocess.Popen(
        ["bash", str(root / "scripts" / "llama-server"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHON": sys.executable},
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/models", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("llama server not ready")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def measure_class(
    name: str, upstream: str, offset: str, samples: int, max_tokens: int, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One class's numbers (module docstring); ``settings``: more model config keys
    (``{"scope_action": "rewrite"}``)."""
    import openai

    from proxy.config import ModelConfig, ServerConfig
    from proxy.protocol.choices import complete, make_job
    from proxy.protocol.schemas import ChatCompletionRequest, Message
    from proxy.registry import build_model
    from proxy.training.demo import DEMO_FORGET, DEMO_KEYS, DEMO_PARAPHRASES, DEMO_UNRELATED
    from proxy.training.scope import mentions

    cut, keys = CLASSES[name]
    os.environ.setdefault("OPENAI_API_KEY", "unused-on-loopback")
    os.environ.setdefault("GROQ_API_KEY", "unused-on-loopback")
    forget = [json.loads(x)["question"] for x in DEMO_FORGET.read_text().splitlines() if x.strip()]
    async with running(upstream, cut) as (base_url, stats):
        cfg = ModelConfig(
            base_url=base_url, remote_model="smollm2", pair="smollm2", offset=offset, **keys, **(settings or {})
        )
        model = build_model("demo", cfg)
        direct = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
        calls: list[int] = []
        refused: list[bool] = []
        proxy_s: list[float] = []
        direct_s: list[float] = []

        async def answer(q: str, alpha: float, temperature: float, seed: int | None = None) -> str:
            req = ChatCompletionRequest(
                model="demo",
                messages=[Message(role="user", content=q)],
                temperature=temperature,
                max_tokens=max_tokens,
                offset_alpha=alpha,
                seed=seed,
            )
            job = make_job(req, {"demo": model}, ServerConfig())
            before = stats["calls"]
            t0 = time.perf_counter()
            r = await complete(job)
            if alpha != 0:
                proxy_s.append(time.perf_counter() - t0)
                calls.append(stats["calls"] - before)
                refused.append(job.stats[0].refused)
            return str(r["choices"][0]["message"]["content"])

        async def direct_answer(q: str, temperature: float) -> None:
            t0 = time.perf_counter()
            await direct.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": q}],
                temperature=temperature,
                max_tokens=max_tokens,
            )
            direct_s.append(time.perf_counter() - t0)

        model.client_alpha = "any"  # the comparison needs α = 0 (the remote's own answer)
        out: dict[str, Any] = {"class": name, "mode": model.mode, "settings": settings or {}, "examples": []}
        for temperature in (0.0, 1.0):
            n = 1 if temperature == 0 else samples
            leak = {"forget": 0, "paraphrase": 0}
            new = {"forget": 0, "paraphrase": 0}
            total = {"forget": 0, "paraphrase": 0}
            for kind, questions in (("forget", forget), ("paraphrase", list(DEMO_PARAPHRASES))):
                for q in questions:
                    # a key the question itself names is not one the answer leaks
                    unasked = [k for k in DEMO_KEYS if not mentions(q, [k])]
                    for i in range(n):
                        a = await answer(q, 1.0, temperature, None if temperature == 0 else 1000 + i)
                        hit, fresh = mentions(a, DEMO_KEYS), mentions(a, unasked)
                        leak[kind] += hit
                        new[kind] += fresh
                        total[kind] += 1
                        out["examples"].append(
                            {
                                "question": q,
                                "temperature": temperature,
                                "answer": a,
                                "key": bool(hit),
                                "new_key": bool(fresh),
                                "refused": refused[-1],
                            }
                        )
                    if temperature == 0:
                        await direct_answer(q, temperature)
            tag = "t0" if temperature == 0 else "t1"
            out[f"leak_{tag}"] = {k: f"{leak[k]}/{total[k]}" for k in leak}
            out[f"leak_{tag}_fraction"] = round(sum(leak.values()) / sum(total.values()), 4)
            out[f"new_key_leak_{tag}"] = {k: f"{new[k]}/{total[k]}" for k in new}
            out[f"new_key_leak_{tag}_fraction"] = round(sum(new.values()) / sum(total.values()), 4)
        same = 0
        for q in DEMO_UNRELATED:
            b, a = await answer(q, 0.0, 0.0), await answer(q, 1.0, 0.0)
            same += a == b
        out["unrelated_unchanged"] = f"{same}/{len(DEMO_UNRELATED)}"
        out["remote_calls_per_answer"] = round(statistics.mean(calls), 2)
        out["seconds_per_answer"] = round(statistics.mean(proxy_s), 3)
        out["direct_seconds_per_answer"] = round(statistics.mean(direct_s), 3)
        out["wall_time_ratio"] = round(statistics.mean(proxy_s) / statistics.mean(direct_s), 2)
        out["refused_by_endpoint"] = {k: v for k, v in stats.items() if k.startswith("refused")}
        await direct.close()
        await model.aclose()
    return out


TABLE_START, TABLE_END = "<!-- providers-table:start", "<!-- providers-table:end -->"


def render_table(result: dict[str, Any]) -> str:
    """A ``bench.providers`` result file as the docs page's markdown table."""
    lines = [
        "| class | strategy | forget leak T=0 | paraphrase leak T=0 | leak T=1 | leak T=1, keys not in the question | forget-scope answers refused | unrelated unchanged | remote calls / answer | s / answer | vs direct |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def refusals(r: dict[str, Any]) -> str:
        # files written before answers recorded "refused": the default refusal text
        flags = [e.get("refused", e["answer"] == "I can't help with that.") for e in r["examples"]]
        return f"{sum(flags)}/{len(flags)}"

    def pooled(counts: dict[str, str]) -> str:
        k = sum(int(v.split("/")[0]) for v in counts.values())
        n = sum(int(v.split("/")[1]) for v in counts.values())
        return f"{k}/{n} ({100 * k / n:.1f} %)"

    for r in result["classes"]:
        mode = r["mode"] + (f" ({', '.join(f'{k} = {v}' for k, v in r['settings'].items())})" if r.get("settings") else "")
        lines.append(
            f"| {r['class']} | {mode} | {r['leak_t0']['forget']} | {r['leak_t0']['paraphrase']} | "
            f"{pooled(r['leak_t1'])} | {pooled(r['new_key_leak_t1'])} | {refusals(r)} | {r['unrelated_unchanged']} | "
            f"{r['remote_calls_per_answer']} | {r['seconds_per_answer']} | {r['wall_time_ratio']}x |"
        )
    lines.append("")
    lines.append(
        f"Demo offset (`{Path(result['offset']).name}`), greedy answers and {result.get('samples', '?')} samples per question "
        f"at T = 1 of at most {result.get('max_tokens', '?')} tokens, {result.get('date', '')[:10]}, 2 CPU cores "
        "(the remote, the endpoint and the pair on the same cores)."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--samples", type=int, default=3, help="answers per question at T = 1")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--offset", help="an offset folder (default: the demo offset, trained once and cached)")
    ap.add_argument("--settings", default="{}", help='more model config keys as JSON ({"scope_action": "rewrite"})')
    ap.add_argument("--json")
    ap.add_argument("--render", help="rewrite this docs page's tables from the result files its markers name")
    args = ap.parse_args()
    if args.render:
        from bench import rewrite_tables

        rewrite_tables(Path(args.render), TABLE_START, TABLE_END, render_table)
        return
    from proxy.training.demo import demo_offset

    offset = args.offset or str(demo_offset(progress=False))
    results = []
    with llama_server() as upstream:
        for name in args.classes.split(","):
            r = asyncio.run(
                measure_class(name, upstream, offset, args.samples, args.max_tokens, json.loads(args.settings))
            )
            print(json.dumps({k: v for k, v in r.items() if k != "examples"}), flush=True)
            results.append(r)
            if args.json:
                Path(args.json + ".partial").write_text(json.dumps(results, indent=1))
    if args.json:
        import datetime as dt

        meta = {"date": dt.datetime.now(dt.UTC).isoformat(), "samples": args.samples, "max_tokens": args.max_tokens}
        Path(args.json).write_text(json.dumps({"offset": offset, **meta, "classes": results}, indent=1))
        Path(args.json + ".partial").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
