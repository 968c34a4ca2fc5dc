"""Flagged spans of one scored output: runs of tokens with Δ < −T as character spans,
widened to whole words and names; masking them; and the calibration of T for a target
false-positive rate."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from proxy.redaction.scoring import RedactError, Scored

MARKER = "[REDACTED]"


#: Lower-case words that join the capitalised words of one name or title ("Award for
#: Storytelling", "The Lord of the Rings", "Ludwig van Beethoven"); not "and", which
#: joins names in lists more often than inside a title.
CONNECTORS = frozenset(
    {"a", "an", "da", "de", "del", "der", "di", "du", "for", "in", "la", "le", "of", "on", "the", "van", "von"}
)
_WORD = re.compile(r"\w+(?:['’]\w+)*")


def capitalised_phrases(text: str) -> list[tuple[int, int]]:
    """Character ranges ``[start, end)`` of the names and titles in ``text``: two or more
    capitalised words in a row, separated by single spaces, possibly joined by
    :data:`CONNECTORS` (never starting or ending with one)."""
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        if not words[i][2][0].isupper():
            i += 1
            continue
        j = last = i
        while j + 1 < len(words) and text[words[j][1] : words[j + 1][0]] == " ":
            word = words[j + 1][2]
            if word[0].isupper():
                last = j + 1
            elif word not in CONNECTORS:
                break
            j += 1
        if last > i:
            out.append((words[i][0], words[last][1]))
        i = last + 1
    return out


def flag_spans(text: str, scored: Scored, threshold: float, *, phrases: bool = True) -> list[dict[str, Any]]:
    """Character spans of the runs of tokens with Δ < −``threshold``, widened to
    word boundaries and, with ``phrases``, to the whole of a name or title they fall
    in (:func:`capitalised_phrases`: a masked "Orchard" would leave "The Last …"
    readable), merged where they touch."""
    flagged = scored.delta < -threshold
    runs: list[list[int]] = []  # [start, end, first token, last token]
    for i in np.flatnonzero(flagged):
        start, end = (int(x) for x in scored.spans[i])
        if runs and i == runs[-1][3] + 1:
            runs[-1][1], runs[-1][3] = end, int(i)
        else:
            runs.append([start, end, int(i), int(i)])
    names = capitalised_phrases(text) if phrases and runs else []
    spans: list[dict[str, Any]] = []
    for start, end, first, last in runs:
        while start < len(text) and text[start].isspace():
            start += 1
        while start > 0 and text[start - 1].isalnum():
            start -= 1
        while end < len(text) and text[end].isalnum():
            end += 1
        if end <= start:
            continue
        for lo, hi in names:
            if lo < end and start < hi:
                start, end = min(start, lo), max(end, hi)
        d = scored.delta[first : last + 1]
        if spans and start <= spans[-1]["end"]:
            prev = spans[-1]
            prev["end"] = max(prev["end"], end)
            prev["min_offset"] = min(prev["min_offset"], float(d.min()))
            prev["_d"] = np.concatenate([prev["_d"], d])
        else:
            spans.append({"start": start, "end": end, "min_offset": float(d.min()), "_d": d})
    for s in spans:
        s["text"] = text[s["start"] : s["end"]]
        s["mean_offset"] = round(float(s.pop("_d").mean()), 4)
        s["min_offset"] = round(s["min_offset"], 4)
    return [{k: s[k] for k in ("start", "end", "text", "min_offset", "mean_offset")} for s in spans]


def mask(text: str, spans: Sequence[dict[str, Any]], marker: str = MARKER) -> str:
    out, pos = [], 0
    for s in spans:
        out.append(text[pos : s["start"]])
        out.append(marker)
        pos = s["end"]
    out.append(text[pos:])
    return "".join(out)


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
