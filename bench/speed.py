"""What the proxy costs over calling the remote directly, in one process and one run.

    python -m bench.speed [--json FILE] [--tokens 96] [--quick]

Remote: llama-cpp-python's server (``scripts/llama-server``, the tests' flags)
on the packaged SmolLM2-135M-Instruct GGUF, served through ``/v1/completions``
with the GGUF's chat template. Pair: SmolLM2 with the demo offset, scope
threshold τ calibrated at train time, as the embedded default serves it.

Measured, all in this run:

- **direct**: the server alone on the same prompts, greedy, with
  ``logprobs=20`` (what the proxy asks for), the same streamed, and without logprobs;
- **proxy, out of scope** (prompts unrelated to the forget set) and **in
  scope** (the demo forget set's questions), greedy and T = 1, with
  speculative acceptance and token by token: wall time, remote calls per 100
  generated tokens, pair milliseconds per generated token on the
  same-tokenizer (fast) and the general path; speculative and token by token again with
  U's rows in every pass (``pair.lazy_u`` off), the baseline of computing U only where the
  scope gate opens (:class:`proxy.pair.scorer.PairScorer`); token by token again with U and B
  in a pass each (``pair.fuse_sides`` off), the baseline of running them as the
  rows of one pass, through transformers' modules (``pair.lean`` empty), the
  baseline of the lean body (:mod:`proxy.pair.lean`), and with every product
  ``x · Wᵀ`` (:data:`proxy.pair.few_rows.MAX_ROWS` 0), the baseline of the
  few-rows products; speculative again with each draft read whole (the remote's
  drafts streamed off), the baseline of streamed drafts;
- **throughput**: aggregate generated tokens/s of the same 16 greedy requests
  run 1, 4 and 16 at a time against ``bench.fake_upstream`` (a fast fake
  server), so that the proxy and its pair, not a model, are measured; with
  speculative acceptance and token by token (16 tokens per answer), and at 16
  streams again with the pair's batching off (a pair of its own with
  ``pair_max_batch`` 1, as a user turns it off): what batching the pair's
  tree passes across requests gains;
- **ceilings** of the 16-stream over 1-stream throughput on this machine: the
  gain of one 16-row pass of the pair's model over one row (1 new token per
  row token by token, ``--tokens`` for a whole drafted answer;
  ``bench.pair_batching``'s measure, on the pair's lean body and its compute
  thread, as the pair runs its passes), divided by the pair's share of a single
  stream's time (the rest, 16 streams could overlap);
- **serve_rss_mb**: peak RSS of this process, which holds the pair and runs
  the decoder (the remote is another process), while it serves the default
  configuration (the llama.cpp part and the fake-upstream part with
  batching on); ``serve_rss_mb_batching_off`` for the ``pair_max_batch`` 1
  pair, ``peak_rss_mb_whole_run``, and ``rss_mb_by_phase``: the peak of each
  part alone (Linux's peak counter, ``VmHWM``, is reset between parts through
  ``/proc/self/clear_refs``).

- **embedded**: ``deltaproxy serve`` on the embedded default (what ``make run``
  starts: SmolLM2 in-process through llama.cpp as the remote, the demo offset),
  a process of its own, through the official openai client: greedy tokens/s
  out of scope and in scope one request at a time
  (``in_scope_over_out_of_scope_embedded``), then 16 concurrent requests, and
  its resident memory after them (``embedded_rss_mb``, ``VmRSS``) and its peak.

Ratios are against runs in this same process; absolute times on 2 shared
cores vary by up to 1.5× from run to run and by a third within one. The sets that the
headline ratios compare run prompt by prompt in turn (:func:`alternating`): greedy
speculative out of scope, in scope and the server alone (``wall_ratio_out_of_scope``,
``in_scope_over_out_of_scope``), the same two with whole drafts, and the embedded default's
out of scope and in scope.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent

OUT_OF_SCOPE = (
    "Write a short paragraph about the history of bicycles.",
    "Explain how a rainbow forms.",
    "Describe a walk through a forest in autumn.",
    "Give three tips for learning to cook.",
    "What does a lighthouse keeper do?",
    "Explain why the sky is blue.",
)


@dataclass
class Run:
    """One set of prompts through one model."""

    tokens: int = 0
    calls: int = 0
    seconds: float = 0.0
    pair_seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    shortened: int = 0
    """Drafts shortened because the pair predicted a rejection at their first position."""

    def __iadd__(self, other: Run) -> Run:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "remote_calls": self.calls,
            "seconds": round(self.seconds, 3),
            "calls_per_100_tokens": round(100 * self.calls / max(1, self.tokens), 2),
            "pair_ms_per_token": round(1000 * self.pair_seconds / max(1, self.tokens), 2),
            "tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "shortened_drafts": self.shortened,
        }


async def run_prompts(model: Any, prompts: tuple[str, ...], *, tokens: int, temperature: float, seed: int = 0) -> Run:
    """Each prompt through ``model.generate``, one after the other."""
    from adapters.base import Context
    from proxy.decoding.types import ChoiceStats, SamplingParams

    run = Run()
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        stats = ChoiceStats()
        params = SamplingParams(
            max_tokens=tokens,
            temperature=temperature,
            seed=seed + i,
            alpha=model.alpha,
            offset_threshold=model.offset_threshold,  # as the server's make_job sets them
            offset_scope=model.offset_scope,
        )
        ctx = Context(messages=({"role": "user", "content": prompt},))
        async for _ in model.generate(ctx, params, stats=stats):
            pass
        run.tokens += stats.completion_tokens
        run.calls += stats.remote_calls
        run.pair_seconds += stats.pair_seconds
        run.drafted += stats.draft_tokens
        run.accepted += stats.accepted_tokens
        run.shortened += stats.predicted_short
    run.seconds = time.perf_counter() - t0
    return run


async def alternating(parts: Sequence[tuple[Callable[[tuple[str, ...], int], Awaitable[Run]], tuple[str, ...]]]) -> list[Run]:
    """Each part's prompts one at a time, the parts in turn (every part's first prompt, then
    every part's second, …), each part's runs summed. A part is a function of (one prompt,
    its index) and its prompts. The machine's speed drifts by up to a third within a run
    here: in turn, the drift falls on every part alike, and the ratios between them hold."""
    totals = [Run() for _ in parts]
    for i in range(max(len(prompts) for _, prompts in parts)):
        for total, (run, prompts) in zip(totals, parts, strict=True):
            if i < len(prompts):
                total += await run((prompts[i],), i)
    return totals


async def direct_prompts(
    adapter: Any, url: str, prompts: tuple[str, ...], *, tokens: int, logprobs: bool, stream: bool = False
) -> Run:
    """The server alone, greedy, on the prompts the proxy renders (same template, same text);
    ``stream``: each answer streamed (and read to its end)."""
    import openai

    from adapters.base import Context

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
    run = Run()
    t0 = time.perf_counter()
    for prompt in prompts:
        text = adapter.render(Context(messages=({"role": "user", "content": prompt},)))
        kwargs: dict[str, Any] = dict(
            model="smollm2",
            prompt=text,
            max_tokens=tokens,
            temperature=0,
            logprobs=20 if logprobs else None,
            extra_body={"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0},
        )
        if stream:
            async for chunk in await client.completions.create(**kwargs, stream=True):
                lp = chunk.choices[0].logprobs if chunk.choices else None
                run.tokens += len(lp.tokens) if lp is not None and lp.tokens else 0
        else:
            r = await client.completions.create(**kwargs)
            run.tokens += r.usage.completion_tokens if r.usage else 0
        run.calls += 1
    run.seconds = time.perf_counter() - t0
    await client.close()
    return run


#: The phases that serve the default configuration (batching on), for ``serve_rss_mb``; the
#: others free the batched pair, serve with batching off, or time bare forward passes.
SERVING_PHASES = ("llama_server", "fake_speculative_1_and_4", "fake_speculative_16", "fake_token_by_token")

TOKEN_BY_TOKEN_TOKENS = 16
"""max_tokens of the token-by-token throughput answers (one remote call per token)."""

STORIES = tuple(f"Tell me a story, number {i}." for i in range(16))


async def throughput(model: Any, streams: int, *, tokens: int) -> dict[str, float]:
    """Aggregate generated tokens/s of :data:`STORIES` (greedy), ``streams`` in flight at a
    time, and the mean number of requests per pass of the pair (its batcher's counters)."""
    gate = asyncio.Semaphore(streams)
    batcher = model.pair.batcher
    passes, jobs = batcher.passes, batcher.jobs

    async def one(p: str) -> Run:
        async with gate:
            return await run_prompts(model, (p,), tokens=tokens, temperature=0.0)

    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one(p) for p in STORIES))
    seconds = time.perf_counter() - t0
    return {
        "tokens_per_second": round(sum(r.tokens for r in runs) / seconds, 1),
        "mean_batch": round((batcher.jobs - jobs) / max(1, batcher.passes - passes), 2),
        # The share of the streams' time spent waiting for or computing on the pair.
        "pair_share": round(sum(r.pair_seconds for r in runs) / (streams * seconds), 3),
    }


class PeakRSS:
    """Peak resident set size of this process per phase, MiB (Linux ``VmHWM``, reset
    between phases by writing ``5`` to ``/proc/self/clear_refs``; see proc(5)).
    Elsewhere only the whole run's peak (``getrusage``) is known, and phases are ``None``."""

    def __init__(self) -> None:
        self.phases: dict[str, float | None] = {}
        self._resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    @staticmethod
    def _hwm_mb() -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None

    def end(self, phase: str) -> None:
        """Record the peak since the last :meth:`end` (or since start) as ``phase``'s."""
        self.phases[phase] = self._hwm_mb() if self._resettable else None
        self._resettable = self._reset()

    def peak_mb(self, phases: tuple[str, ...] | None = None) -> float:
        """The largest peak of ``phases`` (of every phase, the whole run's, without them:
        ``getrusage`` reads the same counter, which the resets lower); ``getrusage``'s
        whole-run peak, an upper bound, where phases could not be measured."""
        known = [v for k, v in self.phases.items() if phases is None or k in phases]
        if known and None not in known:
            return max(v for v in known if v is not None)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def demo_model(name: str, pairs: dict[Any, Any], batching: Any = None, **remote: Any) -> Any:
    """A served model on the demo offset's pair (shared through ``pairs``; a new pair batches
    with ``batching``, a :class:`proxy.pair.batcher.BatchSettings`), with τ as the embedded default
    serves it, and the remote's ``ModelConfig`` keys ``remote``."""
    from proxy.config import ModelConfig
    from proxy.registry import build_model
    from proxy.training.demo import resolve_offset

    cfg = ModelConfig(pair="smollm2", offset="demo", **remote)
    return build_model(name, cfg, pairs=pairs, batching=batching, resolve_offset=resolve_offset)


def _start_fake(repeat: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_upstream", "--repeat", str(repeat)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("base_url: "):
        proc.kill()
        raise RuntimeError(f"bench.fake_upstream did not start: {line!r}")
    return proc, line.split(" ", 1)[1].strip()


def _vm_mb(pid: int, key: str) -> float:
    """``key`` (``VmRSS``, ``VmHWM``) of process ``pid``, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise KeyError(key)


def embedded_part(out_prompts: tuple[str, ...], in_prompts: tuple[str, ...], tokens: int) -> dict[str, Any]:
    """``deltaproxy serve`` on the embedded default (what ``make run`` starts), in a process of
    its own, through the official openai client: greedy tokens/s out of scope and in scope,
    one request at a time; then 16 concurrent requests (the out-of-scope and in-scope prompts
    in turn); its resident memory after them (``VmRSS``) and its peak (``VmHWM``)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    import tempfile

    log = open(Path(tempfile.gettempdir()) / "bench_speed_embedded.log", "w")  # beside the llama server's
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # the demo offset trains on first use
        wait_until_ready(proc, url + "/ready", what=f"deltaproxy serve (log: {log.name})", timeout=900)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(prompt: str) -> int:
            r = client.chat.completions.create(
                model="smollm2-demo",
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=tokens,
            )
            assert r.usage is not None
            return r.usage.completion_tokens

        ask(out_prompts[0])  # warm
        # out of scope and in scope prompt by prompt in turn (as :func:`alternating`)
        counts, seconds = {"out_of_scope": 0, "in_scope": 0}, {"out_of_scope": 0.0, "in_scope": 0.0}
        for i in range(max(len(out_prompts), len(in_prompts))):
            for name, prompts in (("out_of_scope", out_prompts), ("in_scope", in_prompts)):
                if i < len(prompts):
                    t0 = time.perf_counter()
                    counts[name] += ask(prompts[i])
                    seconds[name] += time.perf_counter() - t0
        rates = {name: round(counts[name] / seconds[name], 2) for name in counts}
        mixed = [q for pair in zip(out_prompts * 3, in_prompts * 3, strict=False) for q in pair][:16]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            n16 = sum(pool.map(ask, mixed))
        seconds16 = time.perf_counter() - t0
        time.sleep(2)  # the pair gives freed memory back once idle
        return {
            "out_of_scope_tokens_per_second": rates["out_of_scope"],
            "in_scope_tokens_per_second": rates["in_scope"],
            "tokens_per_second_16_streams": round(n16 / seconds16, 2),
            "rss_mb_after_16": _vm_mb(proc.pid, "VmRSS"),
            "peak_rss_mb": _vm_mb(proc.pid, "VmHWM"),
        }
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--tokens", type=int, default=96, help="max_tokens per answer")
    ap.add_argument("--quick", action="store_true", help="two prompts per set (a smoke run)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _llama_server

    from proxy.pair.model_files import packaged_gguf
    from proxy.training.demo import DEMO_FORGET

    out_prompts = OUT_OF_SCOPE[:2] if args.quick else OUT_OF_SCOPE
    forget = [json.loads(line)["question"] for line in DEMO_FORGET.read_text().splitlines() if line.strip()]
    in_prompts = tuple(forget[:2] if args.quick else forget[:6])
    pairs: dict[Any, Any] = {}  # one pair (one copy of the weights) for every model below
    rss = PeakRSS()
    results: dict[str, Any] = {"tokens": args.tokens, "prompts": {"out_of_scope": out_prompts, "in_scope": in_prompts}}

    gen = _llama_server(packaged_gguf("smollm2"), [], "bench_speed_llama_server.log")
    url = next(gen)
    try:

        def served(*, speculative: bool, same_tokenizer: bool = True) -> Any:
            return demo_model(
                "smollm2",
                pairs,
                backend="openai-completions",
                base_url=url,
                remote_model="smollm2",
                template="gguf:smollm2",
                same_tokenizer=same_tokenizer,
                speculative=speculative,
            )

        async def llama_part() -> dict[str, Any]:
            from proxy.pair import few_rows

            spec, tbt, general = (
                served(speculative=True),
                served(speculative=False),
                served(speculative=True, same_tokenizer=False),
            )
            res: dict[str, Any] = {}
            # Warm the server's prompt cache and the pair's kernels, then measure.
            await direct_prompts(spec.adapter, url, out_prompts[:1], tokens=8, logprobs=True)
            await run_prompts(spec, out_prompts[:1], tokens=8, temperature=0.0)
            def greedy(p: tuple[str, ...], i: int) -> Awaitable[Run]:  # prompt i of a set, as run_prompts seeds it
                return run_prompts(spec, p, tokens=args.tokens, temperature=0.0, seed=i)

            # The proxy out of scope and in scope and the server alone, prompt by prompt in turn
            # (:func:`alternating`): the wall ratio and the in-scope ratio within one stretch of
            # time. The server's call follows another prompt's, so its prompt cache helps neither.
            res["out_greedy_speculative"], res["in_greedy_speculative"], res["direct_logprobs"] = await alternating(
                [
                    (greedy, out_prompts),
                    (greedy, in_prompts),
                    (lambda p, i: direct_prompts(spec.adapter, url, p, tokens=args.tokens, logprobs=True), out_prompts),
                ]
            )
            res["direct_plain"] = await direct_prompts(
                spec.adapter, url, out_prompts, tokens=args.tokens, logprobs=False
            )
            res["direct_logprobs_streamed"] = await direct_prompts(
                spec.adapter, url, out_prompts, tokens=args.tokens, logprobs=True, stream=True
            )
            # the baseline of lazy U: the same answers with U's rows computed in every pass
            spec.pair.lazy_u = False
            res["out_greedy_speculative_eager_u"] = await run_prompts(
                spec, out_prompts, tokens=args.tokens, temperature=0.0
            )
            spec.pair.lazy_u = True
            # the baseline of streamed drafts: the same answers with each draft read whole
            streamed = spec.adapter.capabilities
            spec.adapter.capabilities = dataclasses.replace(streamed, streams_drafts=False)
            whole = await alternating([(greedy, out_prompts), (greedy, in_prompts)])
            res["out_greedy_speculative_whole_drafts"], res["in_greedy_speculative_whole_drafts"] = whole
            spec.adapter.capabilities = streamed
            res["out_t1_speculative"] = await run_prompts(spec, out_prompts, tokens=args.tokens, temperature=1.0)
            res["out_greedy_general_speculative"] = await run_prompts(
                general, out_prompts, tokens=args.tokens, temperature=0.0
            )
            res["in_t1_speculative"] = await run_prompts(spec, in_prompts, tokens=args.tokens, temperature=1.0)
            res["out_greedy_token_by_token"] = await run_prompts(
                tbt, out_prompts[:2], tokens=args.tokens, temperature=0.0
            )
            tbt.pair.lazy_u = False
            res["out_greedy_token_by_token_eager_u"] = await run_prompts(
                tbt, out_prompts[:2], tokens=args.tokens, temperature=0.0
            )
            tbt.pair.lazy_u = True
            # the baseline of U and B as rows of one pass: the same answers, a pass per model
            tbt.pair.fuse_sides = False
            res["out_greedy_token_by_token_unfused"] = await run_prompts(
                tbt, out_prompts[:2], tokens=args.tokens, temperature=0.0
            )
            tbt.pair.fuse_sides = True
            # the baseline of the lean body: the same answers through transformers' modules
            lean, tbt.pair.lean = tbt.pair.lean, {}
            res["out_greedy_token_by_token_modules"] = await run_prompts(
                tbt, out_prompts[:2], tokens=args.tokens, temperature=0.0
            )
            tbt.pair.lean = lean
            # the baseline of the few-rows products: the same answers with every product x · Wᵀ
            few_rows.MAX_ROWS, kept = 0, few_rows.MAX_ROWS
            res["out_greedy_token_by_token_linear"] = await run_prompts(
                tbt, out_prompts[:2], tokens=args.tokens, temperature=0.0
            )
            few_rows.MAX_ROWS = kept
            res["in_greedy_token_by_token"] = await run_prompts(
                tbt, in_prompts[:2], tokens=args.tokens, temperature=0.0
            )
            for m in (spec, tbt, general):
                await m.adapter.aclose()
            return res

        runs = asyncio.run(llama_part())
        rss.end("llama_server")
    finally:
        gen.close()
    results["llama_server"] = {k: v.as_dict() for k, v in runs.items()}

    fake, fake_url = _start_fake(repeat=10)
    try:

        async def fake_part() -> dict[str, Any]:
            from bench.pair_batching import speedup
            from proxy import release_free_memory
            from proxy.pair import compute
            from proxy.pair.batcher import BatchSettings
            from proxy.pair.forward import body_and_head
            from proxy.pair.sides import Side

            def fake_model(speculative: bool, pairs: dict[Any, Any], batching: Any = None) -> Any:
                return demo_model(
                    "fake",
                    pairs,
                    batching,
                    backend="openai-chat",
                    base_url=fake_url,
                    remote_model="fake",
                    prefill="llama.cpp",
                    same_tokenizer=True,
                    speculative=speculative,
                )

            spec, tbt = fake_model(True, pairs), fake_model(False, pairs)
            res: dict[str, Any] = {}
            await run_prompts(spec, STORIES[:1], tokens=args.tokens, temperature=0.0)  # warm-up
            for n in (1, 4):
                res[f"speculative_{n}"] = await throughput(spec, n, tokens=args.tokens)
            rss.end("fake_speculative_1_and_4")
            res["speculative_16"] = await throughput(spec, 16, tokens=args.tokens)
            rss.end("fake_speculative_16")
            for n in (1, 16):
                res[f"token_by_token_{n}"] = await throughput(tbt, n, tokens=TOKEN_BY_TOKEN_TOKENS)
            rss.end("fake_token_by_token")
            await asyncio.gather(spec.aclose(), tbt.aclose())
            await asyncio.to_thread(spec.pair.close)
            # Batching off as a user turns it off (pair_max_batch = 1: one pair thread, its
            # passes one by one), on a pair of its own that replaces the batched one (not two
            # copies of the weights at once).
            del spec, tbt
            pairs.clear()
            gc.collect()
            release_free_memory()  # what the closed pair's batcher would have done after 1 s idle
            rss.end("batched_pair_freed")
            off: dict[Any, Any] = {}
            spec, tbt = (
                fake_model(True, off, BatchSettings(max_batch=1)),
                fake_model(False, off, BatchSettings(max_batch=1)),
            )
            await run_prompts(spec, STORIES[:1], tokens=args.tokens, temperature=0.0)  # warm-up
            res["speculative_16_unbatched"] = await throughput(spec, 16, tokens=args.tokens)
            res["token_by_token_16_unbatched"] = await throughput(tbt, 16, tokens=TOKEN_BY_TOKEN_TOKENS)
            rss.end("fake_unbatched")
            # What batching can give at most on this machine: 16 rows in one pass of the pair's
            # model over 1 row (n new tokens each: 1 token by token, a whole answer drafted), and
            # a single stream's time outside the pair, which 16 streams could overlap. Last, as its
            # 16-row passes' memory is not serving's.
            inner = body_and_head(spec.pair.model)
            lean = spec.pair.lean.get(Side.B)  # the pair's own passes: its lean body, on its compute thread
            for mode, n, one_stream in (
                ("speculative", args.tokens, res["speculative_1"]),
                ("token_by_token", 1, res["token_by_token_1"]),
            ):
                gain = await asyncio.to_thread(compute.run, speedup, inner, 16, n, lean)
                res[f"ceiling_{mode}"] = {
                    "pass_speedup_16_rows": round(gain, 2),
                    "new_tokens_per_row": n,
                    "throughput_16_over_1_ceiling": round(gain / one_stream["pair_share"], 2),
                }
            rss.end("ceiling")
            await asyncio.gather(spec.aclose(), tbt.aclose())
            await asyncio.to_thread(spec.pair.close)
            return res

        results["fake_upstream"] = asyncio.run(fake_part())
    finally:
        fake.kill()
        fake.wait()

    ll, fk = results["llama_server"], results["fake_upstream"]
    out_spec = runs["out_greedy_speculative"]
    direct_lp, direct_plain = runs["direct_logprobs"], runs["direct_plain"]
    # Wall time per generated token, so that a different number of tokens on either side does not count.
    per_token = lambda r: r.seconds / max(1, r.tokens)  # noqa: E731
    tps_ratio = lambda a, b: round(fk[a]["tokens_per_second"] / fk[b]["tokens_per_second"], 2)  # noqa: E731
    results["summary"] = {
        "calls_per_100_tokens_out_of_scope": ll["out_greedy_speculative"]["calls_per_100_tokens"],
        "calls_per_100_tokens_out_of_scope_t1": ll["out_t1_speculative"]["calls_per_100_tokens"],
        "calls_per_100_tokens_in_scope": ll["in_greedy_speculative"]["calls_per_100_tokens"],
        "calls_per_100_tokens_in_scope_t1": ll["in_t1_speculative"]["calls_per_100_tokens"],
        "calls_per_100_tokens_token_by_token": ll["out_greedy_token_by_token"]["calls_per_100_tokens"],
        "wall_ratio_out_of_scope": round(per_token(out_spec) / per_token(direct_lp), 3),
        "wall_ratio_out_of_scope_vs_no_logprobs": round(per_token(out_spec) / per_token(direct_plain), 3),
        # against the server alone streaming its answer with logprobs (llama-cpp-python streams faster)
        "wall_ratio_out_of_scope_vs_streamed": round(
            per_token(out_spec) / per_token(runs["direct_logprobs_streamed"]), 3
        ),
        "wall_ratio_out_of_scope_whole_drafts": round(
            per_token(runs["out_greedy_speculative_whole_drafts"]) / per_token(direct_lp), 3
        ),
        "in_scope_over_out_of_scope_whole_drafts": round(
            ll["in_greedy_speculative_whole_drafts"]["tokens_per_second"]
            / ll["out_greedy_speculative_whole_drafts"]["tokens_per_second"],
            3,
        ),
        "wall_ratio_token_by_token": round(per_token(runs["out_greedy_token_by_token"]) / per_token(direct_lp), 3),
        "in_scope_over_out_of_scope": round(
            ll["in_greedy_speculative"]["tokens_per_second"] / ll["out_greedy_speculative"]["tokens_per_second"], 3
        ),
        "pair_ms_per_token_fast": ll["out_greedy_speculative"]["pair_ms_per_token"],
        "pair_ms_per_token_general": ll["out_greedy_general_speculative"]["pair_ms_per_token"],
        "pair_ms_per_token_fast_eager_u": ll["out_greedy_speculative_eager_u"]["pair_ms_per_token"],
        "pair_fast_lazy_u_over_eager_u": round(
            ll["out_greedy_speculative"]["pair_ms_per_token"] / ll["out_greedy_speculative_eager_u"]["pair_ms_per_token"],
            3,
        ),
        "wall_ratio_out_of_scope_eager_u": round(
            per_token(runs["out_greedy_speculative_eager_u"]) / per_token(direct_lp), 3
        ),
        "pair_ms_per_token_token_by_token_eager_u": ll["out_greedy_token_by_token_eager_u"]["pair_ms_per_token"],
        "pair_token_by_token_lazy_u_over_eager_u": round(
            ll["out_greedy_token_by_token"]["pair_ms_per_token"]
            / ll["out_greedy_token_by_token_eager_u"]["pair_ms_per_token"],
            3,
        ),
        "pair_ms_per_token_token_by_token": ll["out_greedy_token_by_token"]["pair_ms_per_token"],
        "pair_ms_per_token_token_by_token_unfused": ll["out_greedy_token_by_token_unfused"]["pair_ms_per_token"],
        "pair_token_by_token_fused_over_unfused": round(
            ll["out_greedy_token_by_token"]["pair_ms_per_token"]
            / ll["out_greedy_token_by_token_unfused"]["pair_ms_per_token"],
            3,
        ),
        "pair_ms_per_token_token_by_token_modules": ll["out_greedy_token_by_token_modules"]["pair_ms_per_token"],
        "pair_ms_per_token_token_by_token_linear": ll["out_greedy_token_by_token_linear"]["pair_ms_per_token"],
        "pair_token_by_token_few_rows_over_linear": round(
            ll["out_greedy_token_by_token"]["pair_ms_per_token"]
            / ll["out_greedy_token_by_token_linear"]["pair_ms_per_token"],
            3,
        ),
        "pair_token_by_token_lean_over_modules": round(
            ll["out_greedy_token_by_token"]["pair_ms_per_token"]
            / ll["out_greedy_token_by_token_modules"]["pair_ms_per_token"],
            3,
        ),
        "throughput_4_over_1": tps_ratio("speculative_4", "speculative_1"),
        "throughput_16_over_1": tps_ratio("speculative_16", "speculative_1"),
        "throughput_16_over_1_token_by_token": tps_ratio("token_by_token_16", "token_by_token_1"),
        "batching_gain_16": tps_ratio("speculative_16", "speculative_16_unbatched"),
        "batching_gain_16_token_by_token": tps_ratio("token_by_token_16", "token_by_token_16_unbatched"),
        "mean_batch_16": fk["speculative_16"]["mean_batch"],
        "mean_batch_16_token_by_token": fk["token_by_token_16"]["mean_batch"],
        # Bounds on throughput_16_over_1 from this machine's pair: the 16-row pass's gain over
        # one row, divided by the pair's share of a single stream's time.
        "throughput_16_over_1_ceiling": fk["ceiling_speculative"]["throughput_16_over_1_ceiling"],
        "throughput_16_over_1_ceiling_token_by_token": fk["ceiling_token_by_token"]["throughput_16_over_1_ceiling"],
        # The embedded default's configuration (batching on) on the llama.cpp remote and at 1 to 16
        # streams; the pair_max_batch = 1 comparison and the whole run are reported beside it.
        "serve_rss_mb": rss.peak_mb(SERVING_PHASES),
        "serve_rss_mb_batching_off": rss.phases["fake_unbatched"],
        "peak_rss_mb_whole_run": rss.peak_mb(),
    }
    results["rss_mb_by_phase"] = rss.phases
    results["embedded"] = emb = embedded_part(out_prompts, in_prompts, args.tokens)
    results["summary"].update(
        {
            "in_scope_over_out_of_scope_embedded": round(
                emb["in_scope_tokens_per_second"] / emb["out_of_scope_tokens_per_second"], 3
            ),
            "embedded_rss_mb": emb["rss_mb_after_16"],
            "embedded_peak_rss_mb": emb["peak_rss_mb"],
        }
    )
    report(results, args.json)


if __name__ == "__main__":
    main()
