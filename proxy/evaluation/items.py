"""The audit's inputs: its settings, the item files of each split, the policy file and a
reference audit's truth ratios; and the names its metrics go by (open-unlearning's), which a
policy may bound.

Items are TOFU-shaped JSONL lines (``question``, ``answer``, and for the probability
metrics ``paraphrased_answer`` and ``perturbed_answer``; for the leak rate and extraction
``key_spans``, by default the whole answer); ``bench/tofu_lite.py`` writes such files.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    """Items evaluated at once; the audit's sampled answers are drawn ``concurrency²`` at a
    time across its items (:func:`proxy.evaluation.summary.sample_gate`; the pair batches
    their passes: :class:`proxy.pair.batcher.TreeBatcher`)."""
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
