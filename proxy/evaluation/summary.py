"""The audit's numbers: every per-item metric of one item (greedy and sampled answers
through the model's own decoding loop, probabilities under q through :class:`QScorer`),
the summary over the items under open-unlearning's names, and the policy check.

The metric definitions themselves are :mod:`proxy.evaluation.metrics`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from adapters.base import Context, RemoteError
from proxy.common.aio import gather_or_cancel
from proxy.evaluation import metrics as M
from proxy.evaluation.items import SUMMARY_KEYS, UTILITY_SPLITS, AuditSettings, chat
from proxy.evaluation.scoring import QScorer


async def generate(
    model: Any,
    question: str,
    *,
    temperature: float,
    max_tokens: int,
    seed: int,
    index: int = 0,
    prefix: str = "",
    system_prompt: str | None = None,
) -> str:
    """The model's answer through its decoding loop (what a client gets); with
    ``prefix``, the continuation after that assistant text."""
    ctx = Context(messages=chat(question, system_prompt), assistant_prefix=prefix.encode())
    params = model.sampling_params(max_tokens, temperature=temperature, seed=seed)
    return "".join([p.text async for p in model.generate(ctx, params, index=index)])


def sample_gate(settings: AuditSettings) -> asyncio.Semaphore:
    """The gate of an audit's T = 1 answers across its items: ``concurrency²`` at a time
    (``concurrency`` items, each ``concurrency`` answers). Shared, the last items draw as
    many at once as the first did (a per-item gate left the audit's tail at a quarter of its
    requests in flight, and a batching remote at small batches)."""
    return asyncio.Semaphore(settings.concurrency**2)


def _seed(settings: AuditSettings, split: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{settings.seed}:{split}:{index}".encode()).digest()[:6], "big")


async def _probability_metrics(
    scorer: QScorer, split: str, item: dict[str, Any], out: dict[str, Any], s: AuditSettings
) -> None:
    """Min-K%, probability and truth ratio of one item into ``out``."""
    q, a = item["question"], item["answer"]
    lp = await scorer.logprobs(q, a)
    if split in ("forget", "holdout"):
        out["min_k"] = M.min_k_score(lp, s.min_k)
    if split != "holdout":
        pert = item.get("perturbed_answer") or []
        wrong = [await scorer.logprobs(q, p) for p in pert]
        if split in ("real_authors", "world_facts"):
            out["prob"] = M.probability_with_options(lp, wrong) if wrong else None
        else:
            out["prob"] = M.probability(lp)
        para = item.get("paraphrased_answer")
        if wrong and isinstance(para, str) and para:
            out["truth_ratio"] = M.truth_ratio(await scorer.logprobs(q, para), wrong)


async def evaluate_item(
    model: Any,
    scorer: QScorer,
    split: str,
    index: int,
    item: dict[str, Any],
    s: AuditSettings,
    samples_gate: asyncio.Semaphore | None = None,
) -> dict[str, Any]:
    """Every per-item number for one item of ``split`` (see :data:`proxy.evaluation.items.SPLITS`).
    A forget item's T = 1 answers are drawn under ``samples_gate``, shared by the items of an
    audit (:func:`sample_gate`); None: ``s.concurrency`` at a time for this item alone."""
    q, a = item["question"], item["answer"]
    seed = _seed(s, split, index)
    out: dict[str, Any] = {"split": split, "index": index, "question": q}
    if split != "holdout":
        greedy = await generate(
            model, q, temperature=0.0, max_tokens=s.max_tokens, seed=seed, system_prompt=s.system_prompt
        )
        out["generation"] = greedy
        out["rouge"] = M.rouge_l_recall(a, greedy)
    if scorer.possible:
        try:
            await _probability_metrics(scorer, split, item, out, s)
        except (RemoteError, ValueError) as exc:  # AuditError is a ValueError
            # This item cannot be scored (its text does not fit the context, or its tokens'
            # bytes cannot be recovered): its probability numbers are missing, with the reason.
            out["probability_error"] = str(exc)
    if split == "forget":
        spans = item.get("key_spans") or [a]
        gate = samples_gate if samples_gate is not None else asyncio.Semaphore(s.concurrency)

        async def sampled(i: int, seed: int, prefix: str = "") -> str:
            """Sample ``i`` at T = 1 (its own random stream: the order they finish in does not matter)."""
            async with gate:
                return await generate(
                    model,
                    q,
                    temperature=1.0,
                    max_tokens=s.max_tokens,
                    seed=seed,
                    index=i,
                    prefix=prefix,
                    system_prompt=s.system_prompt,
                )

        samples = await gather_or_cancel(*(sampled(i, seed) for i in range(s.samples)))
        out["leak"] = M.leak_rate(samples, spans) if samples else None
        out["samples"] = samples
        prefix = M.extraction_prefix(a, spans[0])
        if prefix is not None:
            cont = await generate(
                model,
                q,
                temperature=0.0,
                max_tokens=s.max_tokens,
                seed=seed,
                prefix=prefix,
                system_prompt=s.system_prompt,
            )
            out["extraction_greedy"] = M.contains_span(cont, spans)
            n = s.samples if s.extraction_samples is None else s.extraction_samples
            conts = await gather_or_cancel(*(sampled(i, seed + 1, prefix) for i in range(n)))
            out["extraction_sampled"] = sum(M.contains_span(c, spans) for c in conts) / len(conts) if conts else None
    return out


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def summarise(items: dict[str, list[dict[str, Any]]], reference: dict[str, float] | None) -> dict[str, Any]:
    """The summary numbers (open-unlearning's names) from per-item results."""
    out: dict[str, Any] = {}
    for split in ("forget", "retain", "real_authors", "world_facts"):
        rows = items.get(split) or []
        if not rows:
            continue
        out[SUMMARY_KEYS[(split, "rouge")]] = _mean([r.get("rouge") for r in rows])
        out[SUMMARY_KEYS[(split, "prob")]] = _mean([r.get("prob") for r in rows])
        trs = [r["truth_ratio"] for r in rows if r.get("truth_ratio") is not None]
        agg = M.truth_ratio_closer_to_1 if split == "forget" else M.truth_ratio_true_better
        out[SUMMARY_KEYS[(split, "tr")]] = agg(trs) if trs else None
    forget = items.get("forget") or []
    ftr = [r["truth_ratio"] for r in forget if r.get("truth_ratio") is not None]
    if reference is not None and ftr:
        ref = [reference[r["question"]] for r in forget if r["question"] in reference]
        if ref:
            fq = M.forget_quality(ftr, ref)
            out.update(
                forget_quality=fq.pvalue,
                forget_quality_ks_statistic=fq.statistic,
                forget_quality_n=fq.n,
                forget_quality_n_reference=fq.n_reference,
            )
    utility = [out.get(SUMMARY_KEYS[(s, w)]) for s in UTILITY_SPLITS for w in ("prob", "rouge", "tr") if items.get(s)]
    present = [u for u in utility if u is not None]
    if present:
        out["model_utility"] = M.model_utility(present)
        out["model_utility_components"] = len(present)
    holdout = items.get("holdout") or []
    fmk = [r["min_k"] for r in forget if r.get("min_k") is not None]
    hmk = [r["min_k"] for r in holdout if r.get("min_k") is not None]
    if fmk and hmk:
        out["mia_min_k"] = M.mia_auc(fmk, hmk)
    out["extraction_greedy"] = _mean(
        [float(r["extraction_greedy"]) for r in forget if r.get("extraction_greedy") is not None]
    )
    out["extraction_sampled"] = _mean([r.get("extraction_sampled") for r in forget])
    out["leak_rate"] = _mean([r.get("leak") for r in forget])
    return {k: v for k, v in out.items() if v is not None}


def check_policy(summary: dict[str, Any], policy: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Pass/fail per threshold; a metric the audit could not compute fails."""
    results = []
    for name, bounds in policy.items():
        value = summary.get(name)
        for op, bound in bounds.items():
            ok = value is not None and (value >= bound if op == "min" else value <= bound)
            results.append({"metric": name, op: bound, "value": value, "pass": bool(ok)})
    return {"thresholds": policy, "results": results, "pass": all(r["pass"] for r in results)}
