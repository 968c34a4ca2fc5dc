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
  the model's own decoding loop (:meth:`proxy.decoding.served.ServedModel.generate`),
  exactly what clients get, against any backend.
* **Probability metrics** (probability, truth ratio, forget quality, Min-K%
  AUC) score given text under the served distribution q, where the remote gives the
  logprobs of given text (:mod:`proxy.evaluation.scoring` says which remotes do and how);
  the report's ``probability_support`` says which route served, or why none could.

Output folder: ``items.jsonl`` (one line per evaluated item, appended as it
finishes, so an interrupted audit continues where it stopped; see
:class:`proxy.jobs.runner.LineRunner`), then ``report.json`` and a
self-contained ``report.html`` (plots as inline PNGs), each written to a
temporary file and renamed, so neither is ever half-written. A policy file
(JSON or TOML: ``{"forget_quality": {"min": 0.05}, ...}``) adds pass/fail per
threshold; :func:`run_audit`'s caller exits non-zero when one fails.

The parts: inputs and settings :mod:`proxy.evaluation.items`, scoring under q
:mod:`proxy.evaluation.scoring`, per-item numbers, summary and policy check
:mod:`proxy.evaluation.summary`, plots and HTML :mod:`proxy.evaluation.report`;
this module runs them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.common.files import atomic_write, cache_dir
from proxy.decoding.scoring import PromptLogprobsCache
from proxy.evaluation.items import SPLITS, AuditError, AuditSettings, load_items, load_reference
from proxy.evaluation.report import render_html
from proxy.evaluation.scoring import QScorer
from proxy.evaluation.summary import check_policy, evaluate_item, sample_gate, summarise
from proxy.jobs.ray_engine import RaySettings, WorkerFactory
from proxy.jobs.runner import LineRunner, OnRay, OutputError
from proxy.pair.model_files import file_sha256


async def run_audit(
    model: Any,
    files: dict[str, str],
    out_dir: str | os.PathLike[str],
    *,
    settings: AuditSettings = AuditSettings(),  # noqa: B008 - a frozen dataclass, never changed
    reference: str | None = None,
    policy: dict[str, dict[str, float]] | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    on_item: Callable[[dict[str, Any]], None] | None = None,
    ray: tuple[RaySettings, WorkerFactory] | None = None,
) -> dict[str, Any]:
    """Audit ``model`` on the item files ``files`` (split -> path, at least
    ``forget``); write ``items.jsonl``, ``report.json`` and ``report.html``
    to ``out_dir``; return the report.

    With ``ray``, the items are evaluated on Ray (:mod:`proxy.jobs.ray_engine`), each
    worker built by the factory (``proxy.cli.workers.AuditWorker``: its own model and
    :class:`QScorer`, :func:`evaluate_item` with the same settings); ``model`` then gives
    the report its identity and what can be scored. The summary and report are made here.

    Raises:
        AuditError: bad input files, an output folder holding another audit, or one
            that another audit is writing.
    """
    from tqdm import tqdm

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
    todo = [(s, i) for s in SPLITS for i in range(len(data.get(s, [])))]
    runner: LineRunner[tuple[str, int]] = LineRunner(
        out / "items.jsonl",
        json.dumps(identity, sort_keys=True).encode(),
        item_key=lambda si: f"{si[0]}:{si[1]}",
        line_key=lambda o: f"{o['split']}:{o['index']}",
        exclusive=True,
    )
    try:
        done = runner.open(todo)
    except OutputError as exc:
        raise AuditError(f"--out: {exc}") from exc
    results = {f"{o['split']}:{o['index']}": o for o in done}

    gate = sample_gate(settings)

    async def answer(si: tuple[str, int]) -> dict[str, Any]:
        split, i = si
        return await evaluate_item(model, scorer, split, i, data[split][i], settings, gate)

    def keep(row: dict[str, Any]) -> None:
        results[f"{row['split']}:{row['index']}"] = row
        if on_item is not None:
            on_item(row)

    await runner.run(
        answer,
        counts=lambda: {"items": len(results), "total": len(todo)},
        bar=tqdm(total=len(todo), initial=len(results), desc="audit", unit="item", disable=not progress),
        concurrency=settings.concurrency,
        on_line=keep,
        ray=None
        if ray is None
        else OnRay(ray[0], ray[1], lambda si: {"split": si[0], "index": si[1], "item": data[si[0]][si[1]]}),
    )
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
