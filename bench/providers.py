"""Each capability class of hosted APIs, measured on a forget set: its offset in front of a
real local server, through a loopback endpoint whose capabilities are cut to the class
(:mod:`bench.capability_shim`), served with the strategy ``decoding = "auto"`` picks for it.

    python -m bench.providers [--probes demo|tofu-lite] [--classes token,guided,sequence-logprobs,sequence]
                              [--samples 3] [--settings '{"scope_action": "rewrite"}'] [--json FILE]
    python -m bench.providers --render docs/benchmarks.md

``--probes demo`` (default): the demo offset in front of llama-cpp-python's server on the
packaged SmolLM2. ``--probes tofu-lite``: the tofu-lite target (``bench.tofu_models``, the
fine-tuned SmolLM2 that knows the fictitious authors) served by vLLM, and the offset that
``deltaproxy train`` gives with its defaults on forget10 and retain90 (NPO+KL, cached as
``bench.tofu``'s ``delta:NPO+KL`` row with ``--offset-settings '{}'``), served with the
τ its self-check calibrated.

Per class, at T = 0 (one answer per question) and T = 1 (``--samples`` answers per question):
how many answers to the forget questions and their paraphrases name a key (the demo's
:data:`proxy.training.demo.DEMO_KEYS`; a tofu-lite item's own key spans); how many of the
unrelated greedy answers (and tofu-lite's neighbours: other fictitious authors) equal the
remote's own (α = 0); remote calls per answer; and the wall time of an answer against a direct
call to the same endpoint (the same questions, the same settings). A first row gives the
remote's own leak on the same questions and seeds, without the proxy.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import wait_until_ready
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
        wait_until_ready(proc, url + "/models", what="llama server", timeout=180, ready=lambda status: status < 500)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@dataclass(frozen=True)
class Probe:
    """A question and the key spans an answer to it must not hold."""

    question: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Probes:
    """One forget set's questions: ``forget`` (the forget set's own) and ``paraphrases``
    (never trained on), each with its keys; ``unrelated`` questions whose greedy answers
    must stay the remote's own, and ``neighbours`` (near the forget set, out of its scope)
    likewise; ``leaks(answer, keys)`` says whether an answer names a key."""

    name: str
    forget: tuple[Probe, ...]
    paraphrases: tuple[Probe, ...]
    unrelated: tuple[str, ...]
    leaks: Callable[[str, Sequence[str]], bool]
    neighbours: tuple[str, ...] = ()


def demo_probes() -> Probes:
    """The demo's: its 12 forget questions and 12 paraphrases, every one against every
    :data:`~proxy.training.demo.DEMO_KEYS` (a whole word, any case), and its 12 unrelated
    questions."""
    from proxy.training.demo import DEMO_FORGET, DEMO_KEYS, DEMO_PARAPHRASES, DEMO_UNRELATED
    from proxy.training.scope import mentions

    forget = [json.loads(x)["question"] for x in DEMO_FORGET.read_text().splitlines() if x.strip()]
    return Probes(
        name="demo",
        forget=tuple(Probe(q, DEMO_KEYS) for q in forget),
        paraphrases=tuple(Probe(q, DEMO_KEYS) for q in DEMO_PARAPHRASES),
        unrelated=tuple(DEMO_UNRELATED),
        leaks=mentions,
    )


#: tofu-lite questions whose greedy answers must stay the target's: this many of its world
#: facts (general knowledge) as ``unrelated``, and as many retain questions (other fictitious
#: authors, the nearest out-of-scope questions there are) as ``neighbours`` (few: with vLLM
#: on the same 2 cores each class takes about 15 minutes as it is).
TOFU_NEIGHBOURS = 6


def tofu_probes(data: Path) -> Probes:
    """tofu-lite's (``bench.tofu_lite``, folder ``data``): the forget10 questions and their
    paraphrased questions, each against its own item's key spans (the audit's leak rule,
    :func:`proxy.evaluation.metrics.contains_span`); the first :data:`TOFU_NEIGHBOURS` world
    facts as unrelated questions, and as many retain questions as neighbours."""
    from proxy.evaluation.metrics import contains_span

    def items(name: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in (data / name).read_text().splitlines() if x.strip()]

    forget = items("forget10.jsonl")
    return Probes(
        name="tofu-lite",
        forget=tuple(Probe(it["question"], tuple(it["key_spans"])) for it in forget),
        paraphrases=tuple(Probe(it["paraphrased_question"], tuple(it["key_spans"])) for it in forget),
        unrelated=tuple(it["question"] for it in items("world_facts.jsonl")[:TOFU_NEIGHBOURS]),
        neighbours=tuple(it["question"] for it in items("retain_perturbed.jsonl")[:TOFU_NEIGHBOURS]),
        leaks=contains_span,
    )


async def measure_remote(
    upstream: str, probes: Probes, samples: int, max_tokens: int, upstream_model: str | None = None
) -> dict[str, Any]:
    """The remote alone (no proxy, every capability), on the same questions and seeds as
    :func:`measure_class`: how often its own answers name a key (the rate an offset lowers)."""
    import openai

    async with running(upstream, Cut(), upstream_model=upstream_model) as (base_url, _stats):
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
        out: dict[str, Any] = {"class": "remote alone", "mode": "none (α = 0)", "examples": []}
        for temperature in (0.0, 1.0):
            n = 1 if temperature == 0 else samples
            leak = {"forget": 0, "paraphrase": 0}
            total = {"forget": 0, "paraphrase": 0}
            for kind, questions in (("forget", probes.forget), ("paraphrase", probes.paraphrases)):
                for p in questions:
                    for i in range(n):
                        r = await client.chat.completions.create(
                            model="remote",
                            messages=[{"role": "user", "content": p.question}],
                            temperature=temperature,
                            max_tokens=max_tokens,
                            seed=None if temperature == 0 else 1000 + i,
                        )
                        a = r.choices[0].message.content or ""
                        hit = probes.leaks(a, p.keys)
                        leak[kind] += hit
                        total[kind] += 1
                        out["examples"].append(
                            {"question": p.question, "temperature": temperature, "answer": a, "key": hit}
                        )
            tag = "t0" if temperature == 0 else "t1"
            out[f"leak_{tag}"] = {k: f"{leak[k]}/{total[k]}" for k in leak}
            out[f"leak_{tag}_fraction"] = round(sum(leak.values()) / sum(total.values()), 4)
        await client.close()
    return out


async def measure_class(
    name: str,
    upstream: str,
    offset: str,
    samples: int,
    max_tokens: int,
    settings: dict[str, Any] | None = None,
    probes: Probes | None = None,
    upstream_model: str | None = None,
) -> dict[str, Any]:
    """One class's numbers (module docstring) on ``probes`` (default: the demo's);
    ``settings``: more model config keys (``{"scope_action": "rewrite"}``)."""
    import openai

    from proxy.config import ModelConfig, ServerConfig
    from proxy.protocol.choices import complete, make_job
    from proxy.protocol.schemas import ChatCompletionRequest, Message
    from proxy.registry import build_model

    probes = probes or demo_probes()
    cut, keys = CLASSES[name]
    os.environ.setdefault("OPENAI_API_KEY", "unused-on-loopback")
    os.environ.setdefault("GROQ_API_KEY", "unused-on-loopback")
    async with running(upstream, cut, upstream_model=upstream_model) as (base_url, stats):
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
            for kind, questions in (("forget", probes.forget), ("paraphrase", probes.paraphrases)):
                for p in questions:
                    # a key the question itself names is not one the answer leaks
                    unasked = [k for k in p.keys if not probes.leaks(p.question, [k])]
                    for i in range(n):
                        a = await answer(p.question, 1.0, temperature, None if temperature == 0 else 1000 + i)
                        hit, fresh = probes.leaks(a, p.keys), probes.leaks(a, unasked)
                        leak[kind] += hit
                        new[kind] += fresh
                        total[kind] += 1
                        out["examples"].append(
                            {
                                "question": p.question,
                                "temperature": temperature,
                                "answer": a,
                                "key": bool(hit),
                                "new_key": bool(fresh),
                                "refused": refused[-1],
                            }
                        )
                    if temperature == 0:
                        await direct_answer(p.question, temperature)
            tag = "t0" if temperature == 0 else "t1"
            out[f"leak_{tag}"] = {k: f"{leak[k]}/{total[k]}" for k in leak}
            out[f"leak_{tag}_fraction"] = round(sum(leak.values()) / sum(total.values()), 4)
            out[f"new_key_leak_{tag}"] = {k: f"{new[k]}/{total[k]}" for k in new}
            out[f"new_key_leak_{tag}_fraction"] = round(sum(new.values()) / sum(total.values()), 4)
        for field, asked in (("unrelated_unchanged", probes.unrelated), ("neighbours_unchanged", probes.neighbours)):
            if not asked:
                continue
            same = 0
            for q in asked:
                b, a = await answer(q, 0.0, 0.0), await answer(q, 1.0, 0.0)
                same += a == b
                if a != b:
                    out.setdefault("changed", []).append({"question": q, "answer": a, "remote": b})
            out[field] = f"{same}/{len(asked)}"
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
    neighbours = any("neighbours_unchanged" in r for r in result["classes"])
    lines = [
        "| class | strategy | forget leak T=0 | paraphrase leak T=0 | leak T=1 | leak T=1, keys not in the question | forget-scope answers refused | unrelated unchanged | "
        + ("neighbours unchanged | " if neighbours else "")
        + "remote calls / answer | s / answer | vs direct |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if neighbours else ""),
    ]

    def refusals(r: dict[str, Any]) -> str:
        # files written before answers recorded "refused": the default refusal text
        flags = [e.get("refused", e["answer"] == "I can't help with that.") for e in r["examples"]]
        return f"{sum(flags)}/{len(flags)}"

    def pooled(counts: dict[str, str]) -> str:
        k = sum(int(v.split("/")[0]) for v in counts.values())
        n = sum(int(v.split("/")[1]) for v in counts.values())
        return f"{k}/{n} ({100 * k / n:.1f} %)"

    remote = result.get("remote")
    if remote:
        empty = " – |" * (6 + neighbours)
        lines.append(
            f"| {remote['class']} | {remote['mode']} | {remote['leak_t0']['forget']} | {remote['leak_t0']['paraphrase']} | "
            f"{pooled(remote['leak_t1'])} |{empty}"
        )
    for r in result["classes"]:
        mode = r["mode"] + (
            f" ({', '.join(f'{k} = {v}' for k, v in r['settings'].items())})" if r.get("settings") else ""
        )
        lines.append(
            f"| {r['class']} | {mode} | {r['leak_t0']['forget']} | {r['leak_t0']['paraphrase']} | "
            f"{pooled(r['leak_t1'])} | {pooled(r['new_key_leak_t1'])} | {refusals(r)} | {r['unrelated_unchanged']} | "
            + (f"{r.get('neighbours_unchanged', '–')} | " if neighbours else "")
            + f"{r['remote_calls_per_answer']} | {r['seconds_per_answer']} | {r['wall_time_ratio']}x |"
        )
    lines.append("")
    what = {"demo": "Demo offset", "tofu-lite": "tofu-lite, the training defaults' offset"}[
        result.get("probes", "demo")
    ]
    n = result.get("samples", "?")
    samples = f"{n} sample" + ("" if n == 1 else "s")
    lines.append(
        f"{what} (`{Path(result['offset']).name}`), greedy answers and {samples} per question "
        f"at T = 1 of at most {result.get('max_tokens', '?')} tokens, {result.get('date', '')[:10]}, 2 CPU cores "
        "(the remote, the endpoint and the pair on the same cores"
        + ("; the remote: vLLM serving the tofu-lite target)." if result.get("probes") == "tofu-lite" else ").")
    )
    return "\n".join(lines)


def tofu_setup(offset: str | None) -> tuple[Probes, Path, str]:
    """tofu-lite's probes, the target's folder and the offset: ``offset``, or the one the
    training defaults give on forget10 and retain90 (trained once, cached as ``bench.tofu``
    caches its ``delta:NPO+KL`` row with ``--offset-settings '{}'``)."""
    from bench.tofu import _cached_offset
    from bench.tofu_models import FinetuneSettings, cached_model, default_data
    from proxy.common.literals import ObjectiveName, choice
    from proxy.training.config import TrainConfig

    data = default_data()
    target = cached_model(data / "full.jsonl", "target", FinetuneSettings())
    if offset is None:
        cfg = TrainConfig(
            forget=str(data / "forget10.jsonl"),
            retain=str(data / "retain90.jsonl"),
            out="",
            objective=choice(ObjectiveName, "NPO+KL", "objective"),
            base="smollm2",
        )
        offset = str(_cached_offset("delta:NPO+KL", cfg)[0])
    return tofu_probes(data), target, offset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probes", choices=("demo", "tofu-lite"), default="demo", help="the forget set and its questions")
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--samples", type=int, default=3, help="answers per question at T = 1")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--offset", help="an offset folder (default: the probes' own offset, trained once and cached)")
    ap.add_argument("--settings", default="{}", help='more model config keys as JSON ({"scope_action": "rewrite"})')
    ap.add_argument("--json")
    ap.add_argument("--render", help="rewrite this docs page's tables from the result files its markers name")
    args = ap.parse_args()
    if args.render:
        from bench import rewrite_tables

        rewrite_tables(Path(args.render), TABLE_START, TABLE_END, render_table)
        return
    classes = args.classes.split(",")
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        ap.error(f"unknown class(es) {', '.join(unknown)}; valid: {', '.join(CLASSES)}")
    settings = json.loads(args.settings)
    if args.probes == "tofu-lite":
        from bench.tofu import _vllm

        probes, target, offset = tofu_setup(args.offset)
        server: Any = _vllm(target)
        upstream_model: str | None = "target"
    else:
        from proxy.training.demo import demo_offset

        probes, offset, upstream_model = demo_probes(), args.offset or str(demo_offset(progress=False)), None
        server = llama_server()
    results: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "probes": probes.name,
        "offset": offset,
        "samples": args.samples,
        "max_tokens": args.max_tokens,
    }

    def save(final: bool) -> None:
        import datetime as dt

        from proxy.common.files import atomic_write

        body = {**meta, "date": dt.datetime.now(dt.UTC).isoformat(), "classes": results}
        atomic_write(Path(args.json if final else args.json + ".partial"), json.dumps(body, indent=1))

    with server as upstream:
        meta["remote"] = asyncio.run(measure_remote(upstream, probes, args.samples, args.max_tokens, upstream_model))
        print(json.dumps({k: v for k, v in meta["remote"].items() if k != "examples"}), flush=True)
        for name in classes:
            r = asyncio.run(
                measure_class(name, upstream, offset, args.samples, args.max_tokens, settings, probes, upstream_model)
            )
            print(json.dumps({k: v for k, v in r.items() if k not in ("examples", "changed")}), flush=True)
            results.append(r)
            if args.json:
                save(final=False)
    if args.json:
        save(final=True)
        Path(args.json + ".partial").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
