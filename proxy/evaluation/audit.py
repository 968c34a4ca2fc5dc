"""Compliance audit of a served model: does it still reveal the forget set,
and does it still do its job?

    deltaproxy audit --model NAME --forget FILE --retain FILE [--holdout FILE]
                     [--real-authors FILE] [--world-facts FILE] [--reference DIR]
                     [--policy FILE] --out DIR

Items are TOFU-shaped JSONL lines (``question``, ``answer``, and for the
probability metrics ``paraphrased_answer`` and ``perturbed_answer``; for
the leak rate and extraction ``key_spans``, by default the whole answer);
``bench/tofu_lite.py`` writes such files. Metrics are those of
:mod:`proxy.evaluation.metrics` (open-unlearning's definitions), under open-unlearning's
names (``forget_Q_A_ROUGE``, ``forget_truth_ratio``, ``forget_quality``,
``model_utility``, ``mia_min_k``...).

* **Generation metrics** (ROUGE-L recall of the greedy answer, leak rate of
  key spans in sampled answers, extraction from a prefix prompt) go through
  the model's own decoding loop (:meth:`proxy.decoding.decoder.ServedModel.generate`),
  exactly what clients get, against any backend.
* **Probability metrics** (probability, truth ratio, forget quality, Min-K%
  AUC) score given text under the served distribution q. That needs the
  remote's logprobs of given text: in-process remotes with full logits
  (:class:`adapters.transformers_inprocess.TransformersInProcessAdapter`)
  give them, q then taken over the whole vocabulary at temperature 1 with the
  model's α and scope threshold (:func:`proxy.decoding.offset.target_logits`; Δ on the
  remote's own token ids, so only for a pair with the remote's tokenizer); vLLM
  gives them as ``prompt_logprobs`` (``prefill = "vllm"`` or ``sampling =
  "vllm"``), q then taken over its top-k plus the answer's token with the rest
  of its mass kept (:mod:`proxy.decoding.scoring`; cached on disk under
  ``<cache>/prompt_logprobs``), Δ aligned in bytes as in serving; an in-process
  remote with a pair of another tokenizer is scored the same way (its
  ``score_text``); the report's ``probability_support`` says
  which. llama.cpp's server shifts its ``echo`` logprobs and OpenAI gives
  none, so for those the report marks them "not possible" and says why.

Output folder: ``items.jsonl`` (one line per evaluated item, appended as it
finishes, so an interrupted audit continues where it stopped; see
:class:`proxy.jobs.batch.ResumableOutput`), then ``report.json`` and a
self-contained ``report.html`` (plots as inline PNGs), each written to a
temporary file and renamed, so neither is ever half-written. A policy file
(JSON or TOML: ``{"forget_quality": {"min": 0.05}, ...}``) adds pass/fail per
threshold; :func:`run_audit`'s caller exits non-zero when one fails.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import html
import io
import json
import math
import os
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.base import RemoteError
from proxy import __version__
from proxy.common.aio import gather_or_cancel
from proxy.common.files import atomic_write, cache_dir
from proxy.decoding.scoring import PromptLogprobsCache
from proxy.evaluation import metrics as M

SPLITS = ("forget", "retain", "holdout", "real_authors", "world_facts")
"""Item kinds, in evaluation order. Holdout items are only scored (Min-K%)."""

#: open-unlearning's summary names: (split, what) -> key.
SUMMARY_KEYS = {
    ("forget", "rouge"): "forget_Q_A_ROUGE",
    ("forget", "prob"): "forget_Q_A_Prob",
    ("forget", "tr"): "forget_truth_ratio",
    ("retain", "rouge"): "retain_Q_A_ROUGE",
    ("retain", "prob"): "retain_Q_A_Prob",
    ("retain", "tr"): "retain_Truth_Ratio",
    ("real_authors", "rouge"): "ra_Q_A_ROUGE",
    ("real_authors", "prob"): "ra_Q_A_Prob_normalised",
    ("real_authors", "tr"): "ra_Truth_Ratio",
    ("world_facts", "rouge"): "wf_Q_A_ROUGE",
    ("world_facts", "prob"): "wf_Q_A_Prob_normalised",
    ("world_facts", "tr"): "wf_Truth_Ratio",
}
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
OTHER_KEYS = (
    "forget_quality",
    "forget_quality_ks_statistic",
    "model_utility",
    "mia_min_k",
    "extraction_greedy",
    "extraction_sampled",
    "leak_rate",
)
METRIC_NAMES = frozenset(SUMMARY_KEYS.values()) | frozenset(OTHER_KEYS)


class AuditError(ValueError):
    """Bad audit input (a data, reference or policy file); the message names it."""


@dataclass(frozen=True)
class AuditSettings:
    samples: int = 10
    """Answers sampled at temperature 1 per forget item, for the leak rate, and again for extraction."""
    max_tokens: int = 48
    """Most tokens per generated answer."""
    seed: int = 0
    min_k: float = 0.4
    concurrency: int = 4
    """Items evaluated at once, and a forget item's sampled answers drawn this many at a time
    (the pair batches their passes: :class:`proxy.pair.local.TreeBatcher`)."""
    system_prompt: str | None = None
    """A system message before every question (a prompt-guardrail baseline), or none."""
    extraction_samples: int | None = None
    """Answers sampled at temperature 1 per forget item after the extraction prefix (None:
    ``samples``). 0 with a large ``samples`` measures the leak rate alone."""

    def identity(self) -> dict[str, Any]:
        """The settings that name an audit (its output folder's identity): the fields, less
        ``extraction_samples`` while it is None, so audits written before it resume."""
        out = asdict(self)
        if self.extraction_samples is None:
            del out["extraction_samples"]
        return out


def chat(question: str, system_prompt: str | None = None) -> tuple[dict[str, str], ...]:
    """The messages an item's question is asked with."""
    user = {"role": "user", "content": question}
    return ({"role": "system", "content": system_prompt}, user) if system_prompt else (user,)


# --------------------------------------------------------------------- input
def load_items(path: str | os.PathLike[str], split: str) -> list[dict[str, Any]]:
    """Read one split's JSONL items.

    Raises:
        AuditError: not a file, bad JSON, or a line without string
            ``question``/``answer`` (the line is named).
    """
    p = Path(path)
    if not p.is_file():
        raise AuditError(f"--{split.replace('_', '-')}: {p} is not a file")
    items = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditError(f"{p}:{n}: not valid JSON ({exc.msg})") from exc
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("question"), str)
            or not isinstance(obj.get("answer"), str)
        ):
            raise AuditError(f"{p}:{n}: needs string 'question' and 'answer'")
        pert = obj.get("perturbed_answer")
        if pert is not None and (not isinstance(pert, list) or not all(isinstance(x, str) and x for x in pert)):
            raise AuditError(f"{p}:{n}: 'perturbed_answer' must be a list of non-empty strings")
        spans = obj.get("key_spans", [obj["answer"]])
        if not isinstance(spans, list) or not all(isinstance(s, str) and s for s in spans):
            raise AuditError(f"{p}:{n}: 'key_spans' must be a list of non-empty strings")
        items.append(obj)
    if not items:
        raise AuditError(f"{p}: no items")
    return items


def load_policy(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """``{metric: {"min": x} | {"max": x} | both}`` from a JSON or TOML file.

    Raises:
        AuditError: unreadable, an unknown metric name, or a bound that is not a number.
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AuditError(f"--policy: {p}: {exc}") from exc
    if not isinstance(raw, dict):
        raise AuditError(f"--policy: {p}: expected an object of metric names")
    out: dict[str, dict[str, float]] = {}
    for name, bounds in raw.items():
        if name not in METRIC_NAMES:
            raise AuditError(f"--policy: unknown metric {name!r}; known: {', '.join(sorted(METRIC_NAMES))}")
        if not isinstance(bounds, dict) or not bounds or set(bounds) - {"min", "max"}:
            raise AuditError(f'--policy: {name}: give {{"min": x}} and/or {{"max": x}}')
        for k, v in bounds.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise AuditError(f"--policy: {name}.{k} must be a number")
        out[name] = {k: float(v) for k, v in bounds.items()}
    return out


def load_reference(folder: str | os.PathLike[str]) -> dict[str, float]:
    """Forget truth ratios by question from a reference audit's ``report.json``
    (the retain model's audit: TOFU's reference for forget quality).

    Raises:
        AuditError: no readable report, or one without forget truth ratios.
    """
    p = Path(folder) / "report.json"
    try:
        report = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditError(f"--reference: {p}: {exc}") from exc
    ratios = {
        it["question"]: it["truth_ratio"]
        for it in report.get("items", {}).get("forget", [])
        if it.get("truth_ratio") is not None
    }
    if not ratios:
        raise AuditError(f"--reference: {p} has no forget truth ratios (was its model scorable?)")
    return ratios


# ------------------------------------------------------------------ scoring
class QScorer:
    """Per-token logprobs of given answer text under the served distribution q
    (full vocabulary, temperature 1; see the module docstring).

    ``possible`` says whether this model can be scored; ``reason`` says why not.
    """

    def __init__(self, model: Any, system_prompt: str | None = None, cache: PromptLogprobsCache | None = None) -> None:
        from adapters.base import TextScoringAdapter

        self.model = model
        self.system_prompt = system_prompt
        self.cache = cache
        self.offset_on = bool(model.uses_offset and model.alpha != 0)
        self.possible = True
        self.reason = ""
        self.support = "full vocabulary"
        self.remote_scores = False
        scores_text = model.adapter.capabilities.prompt_logprobs and isinstance(model.adapter, TextScoringAdapter)
        if hasattr(model.adapter, "full_logprobs") and (model.same_tokenizer or not self.offset_on):
            pass  # the whole vocabulary, Δ from the pair on the same token ids
        elif scores_text:
            # a pair with another tokenizer aligns to the remote's tokens in bytes: over its top-k
            self.remote_scores = True
            self.support = f"the remote's top-{model.top_k} plus the answer's token, the rest of its mass kept"
        else:
            self.possible = False
            self.reason = (
                f"remote {model.adapter.name!r} ({type(model.adapter).__name__}) cannot score given text: "
                "it gives no logprobs of given text (llama.cpp's server shifts its echo logprobs, OpenAI gives none; "
                "vLLM's prompt_logprobs can)"
            )

    def _remote(self, question: str, text: str) -> tuple[list[int], np.ndarray]:
        from adapters.base import Context

        return self.model.adapter.full_logprobs(Context(messages=chat(question, self.system_prompt)), text)  # type: ignore[no-any-return]

    async def _remote_scored(self, question: str, text: str) -> np.ndarray:
        """Through the remote's ``prompt_logprobs`` (:mod:`proxy.decoding.scoring`)."""
        from adapters.base import Context
        from proxy.decoding.scoring import q_token_logprobs, score_text, scored_deltas, with_token_bytes

        msgs = chat(question, self.system_prompt)
        scored = await score_text(
            self.model.adapter, Context(messages=msgs), text, top_k=self.model.top_k, cache=self.cache
        )
        if self.offset_on and self.model.same_tokenizer:
            vocab = self.model.pair.vocab
            scored = with_token_bytes(scored, vocab.token_bytes, vocab.eot_ids)
        deltas = None
        if self.offset_on:
            pair = self.model.pair

            def offsets() -> Any:
                aligner = pair.aligner(pair.prompt_ids(list(msgs)), same_tokenizer=self.model.same_tokenizer)
                return scored_deltas(aligner, scored)

            deltas = await self.model.run_pair(offsets)
            if deltas is None:
                raise AuditError("an answer's token bytes could not be recovered from the remote's token strings")
        out = q_token_logprobs(scored, deltas, alpha=self.model.alpha, threshold=self.model.offset_threshold)
        return np.maximum(out, -1e4)

    async def logprobs(self, question: str, text: str) -> np.ndarray:
        """``[n_tokens]`` float64 logprobs (nats) of ``text`` as the answer to ``question``."""
        from proxy.decoding.offset import log_softmax, target_logits

        if self.remote_scores:
            return await self._remote_scored(question, text)

        ids, lr = await asyncio.to_thread(self._remote, question, text)
        if self.offset_on:
            pair = self.model.pair
            msgs = list(chat(question, self.system_prompt))
            prompt_ids = await self.model.run_pair(pair.prompt_ids, msgs, None)
            lu, lb = await self.model.run_pair(pair.full_logprobs, prompt_ids, ids)
            v = min(lr.shape[1], lu.shape[1])
            rows = []
            for i, t in enumerate(ids):
                s = target_logits(
                    lr[i, :v],
                    lu[i, :v] - lb[i, :v],
                    temperature=1.0,
                    alpha=self.model.alpha,
                    threshold=self.model.offset_threshold,
                )
                rows.append(log_softmax(s)[t] if t < v else -np.inf)
            out = np.asarray(rows, dtype=np.float64)
        else:
            out = lr[np.arange(len(ids)), ids]
        return np.maximum(out, -1e4)  # a token q cannot produce: a huge loss, not -inf in JSON


# --------------------------------------------------------------- generation
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
    from adapters.base import Context
    from proxy.decoding.decoder import SamplingParams

    ctx = Context(messages=chat(question, system_prompt), assistant_prefix=prefix.encode())
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        alpha=model.alpha,
        offset_threshold=model.offset_threshold,
    )
    return "".join([p.text async for p in model.generate(ctx, params, index=index)])


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
    model: Any, scorer: QScorer, split: str, index: int, item: dict[str, Any], s: AuditSettings
) -> dict[str, Any]:
    """Every per-item number for one item of ``split`` (see :data:`SPLITS`)."""
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
        gate = asyncio.Semaphore(s.concurrency)

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


# ----------------------------------------------------------------- summary
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


# ---------------------------------------------------------------- the run

async def run_audit(
    model: Any,
    files: dict[str, str],
    out_dir: str | os.PathLike[str],
    *,
    settings: AuditSettings = AuditSettings(),
    reference: str | None = None,
    policy: dict[str, dict[str, float]] | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    on_item: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Audit ``model`` on the item files ``files`` (split -> path, at least
    ``forget``); write ``items.jsonl``, ``report.json`` and ``report.html``
    to ``out_dir``; return the report.

    Raises:
        AuditError: bad input files, or an output folder holding another audit.
    """
    from tqdm import tqdm

    from proxy.jobs.batch import OutputError, ResumableOutput
    from proxy.pair.model_files import file_sha256

    if "forget" not in files:
        raise AuditError("--forget is required")
    if (
        settings.samples < 0
        or (settings.extraction_samples or 0) < 0
        or settings.max_tokens < 1
        or settings.concurrency < 1
    ):
        raise AuditError("--samples and --extraction-samples must be ≥ 0, --max-tokens and --concurrency ≥ 1")
    data = {split: load_items(files[split], split) for split in SPLITS if files.get(split)}
    ref = load_reference(reference) if reference else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scorer = QScorer(model, settings.system_prompt, PromptLogprobsCache(cache_dir() / "prompt_logprobs"))
    identity = {
        "files": {s: file_sha256(Path(p)) for s, p in files.items() if p},
        "settings": settings.identity(),
        "model": info or {},
        "alpha": model.alpha,
        "offset_threshold": model.offset_threshold,
        "offset_sha256": model.offset_sha256,
    }
    store = ResumableOutput(
        out / "items.jsonl", json.dumps(identity, sort_keys=True).encode(), key=lambda o: f"{o['split']}:{o['index']}"
    )
    todo = [(s, i) for s in SPLITS for i in range(len(data.get(s, [])))]
    try:
        done = store.open({f"{s}:{i}" for s, i in todo})
    except OutputError as exc:
        raise AuditError(f"--out: {exc}") from exc
    results = {f"{o['split']}:{o['index']}": o for o in done}
    bar = tqdm(total=len(todo), initial=len(results), desc="audit", unit="item", disable=not progress)
    sem = asyncio.Semaphore(settings.concurrency)

    async def one(split: str, i: int) -> None:
        async with sem:
            row = await evaluate_item(model, scorer, split, i, data[split][i], settings)
        store.write(row)
        results[f"{split}:{i}"] = row
        bar.update(1)
        if on_item is not None:
            on_item(row)

    try:
        await gather_or_cancel(*(one(s, i) for s, i in todo if f"{s}:{i}" not in results))
        store.save_progress({"items": len(results), "total": len(todo)})
    finally:
        store.close()
        bar.close()
    by_split = {s: [results[f"{s}:{i}"] for i in range(len(data.get(s, [])))] for s in SPLITS if s in data}
    summary = summarise(by_split, ref)
    report: dict[str, Any] = {
        "software": {"name": "deltaproxy", "version": __version__},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {
            **(info or {}),
            "alpha": model.alpha,
            "offset_threshold": model.offset_threshold,
            "offset_sha256": model.offset_sha256,
        },
        "data": {s: {"path": str(files[s]), "sha256": identity["files"][s], "items": len(data[s])} for s in data},
        "settings": settings.identity(),
        "reference": None if reference is None else {"path": str(reference), "items": len(ref or {})},
        "possible": {
            "generation_metrics": True,
            "probability_metrics": scorer.possible,
            **({"probability_support": scorer.support} if scorer.possible else {}),
            **({"probability_metrics_reason": scorer.reason} if not scorer.possible else {}),
            "forget_quality": "forget_quality" in summary,
        },
        "summary": summary,
        "policy": check_policy(summary, policy) if policy else None,
        "items": by_split,
    }
    atomic_write(
        out / "report.json", (json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()
    )
    atomic_write(out / "report.html", render_html(report, ref).encode())
    return report


# -------------------------------------------------------------------- HTML
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(report: dict[str, Any], reference: dict[str, float] | None) -> dict[str, str]:
    """The report's figures as PNG data URLs: ROUGE forget vs retain, forget
    truth ratios against the reference's, ROC of the Min-K% membership inference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = report["items"]
    figs: dict[str, str] = {}
    fr = [r["rouge"] for r in items.get("forget", []) if r.get("rouge") is not None]
    rr = [r["rouge"] for r in items.get("retain", []) if r.get("rouge") is not None]
    if fr or rr:
        fig, ax = plt.subplots(figsize=(5, 3))
        bins = np.linspace(0, 1, 11).tolist()
        if fr:
            ax.hist(fr, bins=bins, alpha=0.6, label=f"forget (n={len(fr)})")
        if rr:
            ax.hist(rr, bins=bins, alpha=0.6, label=f"retain (n={len(rr)})")
        ax.set_xlabel("ROUGE-L recall of the greedy answer")
        ax.set_ylabel("items")
        ax.legend()
        figs["rouge"] = _png(fig)
    ftr = [r["truth_ratio"] for r in items.get("forget", []) if r.get("truth_ratio") is not None]
    if ftr:
        fig, ax = plt.subplots(figsize=(5, 3))
        vals = np.log(np.maximum(ftr, 1e-12))
        ref = np.log(np.maximum(list(reference.values()), 1e-12)) if reference else None
        lo, hi = (
            (min(vals.min(), ref.min()), max(vals.max(), ref.max())) if ref is not None else (vals.min(), vals.max())
        )
        bins = np.linspace(lo - 0.1, hi + 0.1, 16).tolist()
        ax.hist(vals, bins=bins, alpha=0.6, label="this model")
        if ref is not None:
            ax.hist(ref, bins=bins, alpha=0.6, label="reference (retain model)")
        ax.set_xlabel("log truth ratio, forget items")
        ax.set_ylabel("items")
        ax.legend()
        figs["truth_ratio"] = _png(fig)
    fmk = [r["min_k"] for r in items.get("forget", []) if r.get("min_k") is not None]
    hmk = [r["min_k"] for r in items.get("holdout", []) if r.get("min_k") is not None]
    if fmk and hmk:
        scores = np.r_[fmk, hmk]
        labels = np.r_[np.zeros(len(fmk)), np.ones(len(hmk))]
        order = np.argsort(-scores, kind="stable")
        tpr = np.r_[0, np.cumsum(labels[order]) / len(hmk)]
        fpr = np.r_[0, np.cumsum(1 - labels[order]) / len(fmk)]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, label=f"Min-K% (AUC {report['summary'].get('mia_min_k', float('nan')):.3f})")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
        ax.set_xlabel("false positive rate (forget called holdout)")
        ax.set_ylabel("true positive rate (holdout)")
        ax.legend()
        figs["mia_roc"] = _png(fig)
    return figs


def _fmt(value: Any, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def render_html(report: dict[str, Any], reference: dict[str, float] | None) -> str:
    """A self-contained HTML page: summary, policy results, plots, per-item table."""
    e = html.escape
    summary = report["summary"]
    rows = "".join(
        f"<tr><td>{e(k)}</td><td>{v:.4g}</td></tr>"
        if isinstance(v, float)
        else f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>"
        for k, v in summary.items()
    )
    policy = report.get("policy")
    pol = ""
    if policy:
        pol_rows = "".join(
            f"<tr class={'pass' if r['pass'] else 'fail'}><td>{e(r['metric'])}</td>"
            f"<td>{'≥ ' + str(r['min']) if 'min' in r else '≤ ' + str(r['max'])}</td>"
            f"<td>{_fmt(r['value'], '.4g', 'n/a')}</td><td>{'pass' if r['pass'] else 'FAIL'}</td></tr>"
            for r in policy["results"]
        )
        verdict = "PASS" if policy["pass"] else "FAIL"
        pol = f"<h2>Policy: {verdict}</h2><table><tr><th>metric</th><th>threshold</th><th>value</th><th></th></tr>{pol_rows}</table>"
    figs = plots(report, reference)
    captions = {
        "rouge": "ROUGE-L recall of greedy answers, forget vs retain items",
        "truth_ratio": "Forget truth ratios against the reference (retain) model's",
        "mia_roc": "ROC of the Min-K% membership inference, forget vs holdout",
    }
    fig_html = "".join(
        f'<figure><img alt="{e(captions[k])}" src="{v}"><figcaption>{e(captions[k])}</figcaption></figure>'
        for k, v in figs.items()
    )
    possible = report["possible"]
    note = (
        ""
        if possible["probability_metrics"]
        else f"<p class=warn>Probability metrics not possible: {e(possible['probability_metrics_reason'])}</p>"
    )
    item_rows = "".join(
        f"<tr><td>{e(r['split'])}</td><td>{e(r['question'])}</td><td>{e(r.get('generation', ''))}</td>"
        f"<td>{_fmt(r.get('rouge'), '.2f')}</td><td>{_fmt(r.get('truth_ratio'), '.3g')}</td>"
        f"<td>{_fmt(r.get('leak'), '.2f')}</td></tr>"
        for split in SPLITS
        for r in report["items"].get(split, [])
    )
    model = report["model"]
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>deltaproxy audit: {e(str(model.get("name", "")))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px;vertical-align:top}}.fail{{background:#fdd}}.pass{{background:#dfd}}
.warn{{color:#a60}}figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>
<h1>deltaproxy audit</h1>
<p>Model <b>{e(str(model.get("name", "")))}</b>, offset sha256 <code>{e(str(model.get("offset_sha256")))}</code>,
α {e(str(model.get("alpha")))}, deltaproxy {e(report["software"]["version"])}, {e(report["date"])}.</p>
{note}{pol}
<h2>Summary</h2><table>{rows}</table>
<h2>Plots</h2>{fig_html}
<h2>Items</h2><table><tr><th>split</th><th>question</th><th>greedy answer</th><th>ROUGE-L</th><th>truth ratio</th><th>leak</th></tr>{item_rows}</table>
</body></html>
"""
