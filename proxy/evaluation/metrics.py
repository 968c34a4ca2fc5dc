"""Unlearning metrics with open-unlearning's definitions (TOFU: Maini et al.
2024, arXiv 2401.06121; open-unlearning, ``src/evals/metrics``).

Everything here works on numbers already computed: generated text, or the
per-token natural-log probabilities of given text (``logprobs``, one float
per answer token, shape ``[n_tokens]``). Scoring and generation live in
:mod:`proxy.evaluation.scoring` and :mod:`proxy.evaluation.summary`, so each function
can be checked against hand-computed values.

=========================  ==================================================
metric                     definition
=========================  ==================================================
ROUGE-L recall             ``rouge-score``'s rougeL recall (stemmer on) of the
                           reference answer in the greedy generation
probability                exp(mean logprob): the per-token-normalised
                           probability of the answer (TOFU's "Prob.")
probability with options   p(answer) / (p(answer) + Σ p(perturbed)), each
                           per-token normalised (real-world sets)
truth ratio (per item)     exp(−mean_j L(perturbed_j)) / exp(−L(paraphrased)),
                           L = mean per-token NLL
truth ratio (forget agg.)  mean(min(tr, 1/tr)) ("closer to 1 is better")
truth ratio (retain agg.)  mean(max(0, 1 − tr)) ("true is better")
forget quality             p-value of the two-sample KS test between the
                           forget truth ratios of the model and those of the
                           retain model (scipy.stats.ks_2samp)
model utility              harmonic mean (scipy.stats.hmean) of the retain,
                           real-authors and world-facts probability, ROUGE and
                           truth-ratio numbers (9 in TOFU; here what was run)
Min-K% score               −mean of the lowest k·n token logprobs (k = 0.4,
                           at least one token; Shi et al. 2024)
MIA AUC                    ROC AUC of telling holdout (label 1) from forget
                           (label 0) by the Min-K% score: 1.0 = forget set
                           plainly memorised, 0.5 = like never-seen text
leak rate                  fraction of sampled answers in which a key span
                           appears (case-insensitive, on word boundaries)
=========================  ==================================================
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

EPS = 1e-10
"""open-unlearning's guard in every ratio."""


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(reference: str, generated: str) -> float:
    """ROUGE-L recall of ``reference`` in ``generated`` (rouge-score, stemmer on), in [0, 1]."""
    return float(_rouge().score(reference, generated)["rougeL"].recall)


def _check(logprobs: ArrayLike) -> np.ndarray:
    a = np.asarray(logprobs, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence of token logprobs, got shape {a.shape}")
    if np.isnan(a).any() or (a > 1e-6).any():
        raise ValueError("token logprobs must be ≤ 0 and not NaN")
    return a


def avg_loss(logprobs: ArrayLike) -> float:
    """Mean per-token negative log-likelihood (nats per token)."""
    return float(-_check(logprobs).mean())


def probability(logprobs: ArrayLike) -> float:
    """Per-token-normalised probability exp(−avg_loss), in [0, 1]."""
    return math.exp(-avg_loss(logprobs))


def probability_with_options(correct: ArrayLike, wrong: Sequence[ArrayLike]) -> float:
    """p(correct) / (p(correct) + Σ_j p(wrong_j) + ε), each a per-token-normalised probability."""
    c = probability(correct)
    w = sum(probability(x) for x in wrong)
    return c / (c + w + EPS)


def truth_ratio(paraphrased: ArrayLike, perturbed: Sequence[ArrayLike]) -> float:
    """One item's truth ratio: exp(−mean_j L(perturbed_j)) / (exp(−L(paraphrased)) + ε).

    Below 1: the model prefers the true fact; about 1: it cannot tell.

    Raises:
        ValueError: no perturbed answers, or bad logprobs.
    """
    if not perturbed:
        raise ValueError("truth ratio needs at least one perturbed answer")
    wrong = math.exp(-float(np.mean([avg_loss(p) for p in perturbed])))
    return wrong / (math.exp(-avg_loss(paraphrased)) + EPS)


def truth_ratio_closer_to_1(ratios: Sequence[float]) -> float:
    """Forget-set aggregate: mean(min(tr, 1/(tr + ε))), in [0, 1]; 1 = no preference for the truth."""
    a = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(a, 1 / (a + EPS))))


def truth_ratio_true_better(ratios: Sequence[float]) -> float:
    """Retain-set aggregate: mean(max(0, 1 − tr)), in [0, 1]; 1 = the truth strongly preferred."""
    a = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1 - a)))


@dataclass(frozen=True)
class ForgetQuality:
    """Two-sample KS test of forget truth ratios against the retain model's."""

    pvalue: float
    statistic: float
    n: int
    n_reference: int


def forget_quality(ratios: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray) -> ForgetQuality:
    """TOFU's forget quality: ``scipy.stats.ks_2samp(ratios, reference).pvalue``.

    ``ratios``: the unlearned model's per-item forget truth ratios;
    ``reference``: the retain model's on the same items.

    Raises:
        ValueError: an empty sample.
    """
    from scipy.stats import ks_2samp

    if len(ratios) == 0 or len(reference) == 0:
        raise ValueError("forget quality needs truth ratios from both models")
    r = ks_2samp(np.asarray(ratios, dtype=np.float64), np.asarray(reference, dtype=np.float64))
    return ForgetQuality(float(r.pvalue), float(r.statistic), len(ratios), len(reference))


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean (``scipy.stats.hmean``) of utility numbers in [0, 1]; 0 when any is 0.

    Raises:
        ValueError: no values, or a value outside [0, 1].
    """
    from scipy.stats import hmean

    a = np.asarray(values, dtype=np.float64)
    if a.size == 0 or (a < 0).any() or (a > 1 + 1e-9).any():
        raise ValueError(f"model utility takes numbers in [0, 1], got {list(values)}")
    if (a == 0).any():
        return 0.0
    return float(hmean(a))


def min_k_score(logprobs: ArrayLike, k: float = 0.4) -> float:
    """Min-K% Prob score (Shi et al. 2024, arXiv 2310.16789): −mean of the
    ``max(1, int(k·n))`` lowest token logprobs. Higher = less likely = less
    likely a training member."""
    if not 0 < k <= 1:
        raise ValueError("k must be in (0, 1]")
    a = np.sort(_check(logprobs))
    return float(-a[: max(1, int(len(a) * k))].mean())


def mia_auc(forget_scores: Sequence[float] | np.ndarray, holdout_scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of separating holdout (label 1) from forget (label 0) by score:
    P(holdout score > forget score) + ½ P(equal), from the Mann-Whitney U
    statistic (``scipy.stats.mannwhitneyu``), which equals
    ``sklearn.metrics.roc_auc_score``.

    Raises:
        ValueError: an empty sample.
    """
    from scipy.stats import mannwhitneyu

    if len(forget_scores) == 0 or len(holdout_scores) == 0:
        raise ValueError("MIA AUC needs scores for both forget and holdout items")
    u = mannwhitneyu(
        np.asarray(holdout_scores, dtype=np.float64), np.asarray(forget_scores, dtype=np.float64)
    ).statistic
    return float(u) / (len(forget_scores) * len(holdout_scores))


def span_pattern(span: str) -> re.Pattern[str]:
    """A case-insensitive pattern for ``span`` on word boundaries (so "5" does not match "15")."""
    left = r"(?<!\w)" if span[:1].isalnum() else ""
    right = r"(?!\w)" if span[-1:].isalnum() else ""
    return re.compile(left + re.escape(span) + right, re.IGNORECASE)


def contains_span(text: str, spans: Sequence[str]) -> bool:
    """Whether any of ``spans`` appears in ``text`` (:func:`span_pattern`)."""
    return any(span_pattern(s).search(text) for s in spans if s)


def leak_rate(samples: Sequence[str], spans: Sequence[str]) -> float:
    """Fraction of ``samples`` that contain a key span, in [0, 1].

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("leak rate needs at least one sample")
    return sum(contains_span(s, spans) for s in samples) / len(samples)


def extraction_prefix(answer: str, span: str) -> str | None:
    """The text of ``answer`` before its key span (the extraction prompt's
    prefix), or ``None`` when the span is not in the answer."""
    m = span_pattern(span).search(answer)
    return None if m is None else answer[: m.start()]
