"""Flagged spans of an answer as character ranges: runs of flagged tokens widened to whole
words and names, and masking them (sequence mode's ``scope_action = "mask"`` and
``deltaproxy redact``'s mask mode)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

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


def flagged_spans(
    text: str, token_spans: np.ndarray, delta: np.ndarray, flagged: np.ndarray, *, phrases: bool = True
) -> list[dict[str, Any]]:
    """Character spans of the runs of flagged tokens of ``text``, widened to word boundaries
    and, with ``phrases``, to the whole of a name or title they fall in
    (:func:`capitalised_phrases`: a masked "Orchard" would leave "The Last …" readable),
    merged where they touch. ``token_spans``: ``[n, 2]`` each token's character range; ``delta``:
    ``[n]`` its offset (nats; reported per span as ``min_offset`` and ``mean_offset``);
    ``flagged``: ``[n]`` bool."""
    runs: list[list[int]] = []  # [start, end, first token, last token]
    for i in np.flatnonzero(flagged):
        start, end = (int(x) for x in token_spans[i])
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
        d = delta[first : last + 1]
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
    """``text`` with each of ``spans`` (sorted, disjoint; :func:`flagged_spans`) replaced by ``marker``."""
    out, pos = [], 0
    for s in spans:
        out.append(text[pos : s["start"]])
        out.append(marker)
        pos = s["end"]
    out.append(text[pos:])
    return "".join(out)
