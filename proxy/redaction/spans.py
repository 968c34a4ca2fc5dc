"""Flagged spans of one scored output: runs of tokens with Δ < −T as character spans,
widened to whole words and names; masking them; and the calibration of T for a target
false-positive rate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from proxy.decoding.spans import CONNECTORS, MARKER, capitalised_phrases, flagged_spans, mask
from proxy.redaction.scoring import RedactError, Scored

__all__ = [
    "CONNECTORS",
    "MARKER",
    "calibrate",
    "capitalised_phrases",
    "flag_spans",
    "flagged_fraction",
    "mask",
]


def flag_spans(text: str, scored: Scored, threshold: float, *, phrases: bool = True) -> list[dict[str, Any]]:
    """Character spans of the runs of tokens with Δ < −``threshold``, widened to word
    boundaries and names (:func:`proxy.decoding.spans.flagged_spans`), merged where they touch."""
    return flagged_spans(text, scored.spans, scored.delta, scored.delta < -threshold, phrases=phrases)


def flagged_fraction(
    texts: Sequence[str],
    scores: Sequence[Scored],
    threshold: float,
    exclude: Sequence[Sequence[tuple[int, int]]] | None = None,
    *,
    phrases: bool = True,
) -> float:
    """Fraction of the characters of ``texts`` inside flagged spans.

    ``exclude``: per text, character ranges ``[start, end)`` counted neither as
    flagged nor in the total (text known to be forget-set content, so neither a
    false nor a true negative)."""
    total = hit = 0
    for i, (text, sc) in enumerate(zip(texts, scores, strict=True)):
        counted = np.ones(len(text), dtype=bool)
        for start, end in exclude[i] if exclude is not None else ():
            counted[start:end] = False
        flagged = np.zeros(len(text), dtype=bool)
        for s in flag_spans(text, sc, threshold, phrases=phrases):
            flagged[s["start"] : s["end"]] = True
        total += int(counted.sum())
        hit += int((flagged & counted).sum())
    return hit / total if total else 0.0


def calibrate(
    texts: Sequence[str],
    scores: Sequence[Scored],
    target_fpr: float,
    exclude: Sequence[Sequence[tuple[int, int]]] | None = None,
    *,
    phrases: bool = True,
) -> tuple[float, float]:
    """The smallest threshold T whose flagged fraction on these (retain, out-of-scope)
    outputs is at most ``target_fpr``; returns (T, the fraction reached).
    ``exclude``, ``phrases``: as :func:`flagged_fraction`'s and :func:`flag_spans`'.

    The fraction can only fall as T grows, so T is found by bisection over
    the observed offsets (plus 0, which flags only Δ < 0).
    """
    if not 0 <= target_fpr < 1:
        raise RedactError("the target false-positive rate must be in [0, 1)")
    candidates = np.unique(np.concatenate([[0.0], *[np.maximum(-s.delta, 0.0) for s in scores]]))
    lo, hi = 0, len(candidates) - 1  # candidates[hi] flags nothing: Δ < −max(−Δ) never holds

    def fraction(t: float) -> float:
        return flagged_fraction(texts, scores, t, exclude, phrases=phrases)

    if fraction(float(candidates[lo])) <= target_fpr:
        hi = lo
    while lo < hi:
        mid = (lo + hi) // 2
        if fraction(float(candidates[mid])) <= target_fpr:
            hi = mid
        else:
            lo = mid + 1
    t = float(candidates[hi])
    return t, fraction(t)
