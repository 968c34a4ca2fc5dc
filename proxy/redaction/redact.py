"""Redaction of outputs written before unlearning (logs, caches, documents).

Each output is scored teacher-forced by the served model's local pair after
its prompt (chat messages rendered with the pair's template, or a raw
prompt): per local token, the offset Δ = log p_U(token) − log p_B(token)
(nats). A token with Δ < −T is forget-scope content: the unlearned model U
finds it far less likely than the base B does. This is the per-token form of
the serving path's scope test (:mod:`proxy.decoding.offset`). Runs of flagged tokens
become character spans of the output, widened to whole words (a masked
"arts" would leave "Hogw…" readable) and to the whole name or title they
fall in (a masked "Orchard" would leave "The Last …" readable).

Input lines: ``{"id", "prompt" | "messages", "output"}``. Output lines:
``{"id", "output", "spans": [{"start", "end", "text", "min_offset",
"mean_offset"}], "mode", "threshold"}`` with character offsets into the
input output (Python ``str`` indices), ``output`` the redacted text; a bad
line gets ``{"id", "error": {"code", "message", "line"}}`` and the run goes
on. Resumable like :mod:`proxy.jobs.batch` (:class:`proxy.jobs.batch.ResumableOutput`).

Modes: ``mask`` replaces every span with a marker; ``regenerate`` keeps the
text before the first span and lets the proxy (remote + offset) write the
rest. ``calibrate`` picks T for a target false-positive rate: the fraction
of characters flagged in outputs that hold no forget-set content.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proxy.common.literals import RedactionMode
from proxy.decoding.decoder import ServedModel
from proxy.jobs.batch import OutputError, ResumableOutput

MARKER = "[REDACTED]"


class RedactError(ValueError):
    """The run cannot go on (bad settings, an output that belongs to another input, …)."""


@dataclass(frozen=True)
class Item:
    line: int
    id: str
    output: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class Scored:
    """Token character spans ``[n, 2]`` into the output and their offsets Δ ``[n]`` (nats)."""

    spans: np.ndarray
    delta: np.ndarray


def parse_item(n: int, raw: bytes) -> Item | dict[str, Any]:
    """An input line as an :class:`Item`, or the error line that answers it."""

    def error(code: str, message: str, ident: Any = None) -> dict[str, Any]:
        return {"id": ident, "error": {"code": code, "message": f"line {n}: {message}", "line": n}}

    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        return error("invalid_json", f"not JSON: {exc}")
    if not isinstance(obj, dict):
        return error("invalid_json", "not a JSON object")
    ident = obj.get("id")
    if not isinstance(ident, str) or not ident:
        return error("missing_required_parameter", "id must be a non-empty string")
    if not isinstance(obj.get("output"), str):
        return error("missing_required_parameter", "output must be a string", ident)
    messages, prompt = obj.get("messages"), obj.get("prompt")
    if (messages is None) == (prompt is None):
        return error("invalid_request", "give exactly one of prompt or messages", ident)
    if prompt is not None and not isinstance(prompt, str):
        return error("invalid_request", "prompt must be a string", ident)
    if messages is not None:
        from pydantic import ValidationError

        from proxy.api.schemas import Message

        try:
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
            messages = [Message.model_validate(m).as_plain() for m in messages]
        except (ValidationError, ValueError) as exc:
            return error("invalid_request", f"messages: {str(exc).splitlines()[0]}", ident)
    return Item(n, ident, obj["output"], messages, prompt)


def score(pair: Any, item: Item) -> Scored:
    """Δ per local token of ``item.output`` after its prompt (teacher-forced).

    Raises:
        ValueError: the pair's template rejects the messages, or the text is
            longer than the pair's context.
    """
    enc = pair.tokenizer(item.output, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not ids:
        return Scored(np.zeros((0, 2), dtype=np.int64), np.zeros(0))
    prompt_ids = pair.prompt_ids(item.messages, item.prompt)
    log_u, log_b = pair.token_logprobs(prompt_ids, ids)
    return Scored(np.asarray(offsets, dtype=np.int64), log_u - log_b)


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


def _key(obj: dict[str, Any]) -> str:
    """What identifies an output line's input line: its id, or for an error line its line number."""
    err = obj.get("error")
    return f"line:{int(err['line'])}" if err else f"id:{obj['id']}"


def _item_key(item: Item | dict[str, Any]) -> str:
    """:func:`_key` of the line that will answer an input item (an error line or a redaction)."""
    return _key(item) if isinstance(item, dict) else f"id:{item.id}"


async def redact_file(
    model: ServedModel,
    inp: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    threshold: float,
    mode: RedactionMode = "mask",
    marker: str = MARKER,
    max_tokens: int = 256,
    progress: bool = True,
) -> dict[str, int]:
    """Redact every line of ``inp`` not yet in ``out``; returns counts.

    Raises:
        RedactError: no offset to score with, a bad mode or threshold, or an
            output that belongs to another input.
    """
    from tqdm import tqdm

    if mode not in ("mask", "regenerate"):
        raise RedactError(f"mode must be mask or regenerate, not {mode!r}")
    if not (threshold >= 0 and np.isfinite(threshold)):
        raise RedactError("the threshold must be a finite number ≥ 0 (nats)")
    if not model.uses_offset:
        raise RedactError(f"model {model.name!r} has no offset: there is nothing to score outputs with")
    data = Path(inp).read_bytes()
    items: list[Item | dict[str, Any]] = []
    seen: set[str] = set()
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            item = parse_item(n, raw)
            if isinstance(item, Item):
                if item.id in seen:
                    item = {
                        "id": item.id,
                        "error": {
                            "code": "duplicate_id",
                            "message": f"line {n}: id {item.id!r} is used on an earlier line",
                            "line": n,
                        },
                    }
                else:
                    seen.add(item.id)
            items.append(item)
    keys = {_item_key(i) for i in items}
    output = ResumableOutput(out, data, _key)
    try:
        done = {_key(o) for o in output.open(keys)}
    except OutputError as exc:
        raise RedactError(str(exc)) from exc
    counts = {"total": len(items), "redacted": 0, "clean": 0, "failed": 0, "skipped": len(done)}
    bar = tqdm(total=len(items), initial=len(done), unit="line", disable=not progress, desc="redact")
    last = time.monotonic()
    try:
        for item in items:
            if _item_key(item) in done:
                continue
            line = (
                item if isinstance(item, dict) else await _redact_one(model, item, threshold, mode, marker, max_tokens)
            )
            output.write(line)
            counts["failed" if "error" in line else "redacted" if line["spans"] else "clean"] += 1
            bar.update()
            if time.monotonic() - last > 1.0:
                output.save_progress({"input": str(inp), **counts})
                last = time.monotonic()
    finally:
        bar.close()
        output.close()
        output.save_progress({"input": str(inp), **counts})
    return counts


async def _redact_one(
    model: ServedModel, item: Item, threshold: float, mode: str, marker: str, max_tokens: int
) -> dict[str, Any]:
    try:
        scored = await model.run_pair(score, model.pair, item)
    except ValueError as exc:
        return {
            "id": item.id,
            "error": {"code": "unscorable", "message": f"line {item.line}: {exc}", "line": item.line},
        }
    spans = flag_spans(item.output, scored, threshold)
    text = item.output
    if spans and mode == "mask":
        text = mask(item.output, spans, marker)
    elif spans and mode == "regenerate":
        from adapters.base import Context
        from proxy.api.errors import from_exception
        from proxy.decoding.decoder import SamplingParams

        keep = item.output[: spans[0]["start"]]
        ctx = Context(
            messages=tuple(item.messages) if item.messages is not None else None,
            prompt=item.prompt,
            assistant_prefix=keep.encode(),
        )
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, alpha=model.alpha, offset_threshold=model.offset_threshold
        )
        try:
            pieces = [p.text async for p in model.generate(ctx, params)]
        except Exception as exc:  # noqa: BLE001 - the line fails, the run goes on
            err = from_exception(exc)
            return {
                "id": item.id,
                "error": {"code": err.code or "regenerate_failed", "message": err.message, "line": item.line},
            }
        text = keep + "".join(pieces)
    return {
        "id": item.id,
        "output": text,
        "spans": spans,
        "mode": mode,
        "threshold": threshold,
        "tokens": int(scored.delta.size),
    }


async def score_file(model: ServedModel, inp: str | os.PathLike[str]) -> tuple[list[str], list[Scored]]:
    """Score every valid line of a file (for :func:`calibrate`).

    Raises:
        RedactError: a line is not valid, or the model has no offset.
    """
    if not model.uses_offset:
        raise RedactError(f"model {model.name!r} has no offset: there is nothing to score outputs with")
    texts, scores = [], []
    for n, raw in enumerate(Path(inp).read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        item = parse_item(n, raw)
        if not isinstance(item, Item):
            raise RedactError(item["error"]["message"])
        try:
            scores.append(await model.run_pair(score, model.pair, item))
        except ValueError as exc:
            raise RedactError(f"line {n}: {exc}") from exc
        texts.append(item.output)
    if not texts:
        raise RedactError(f"{inp} holds no outputs")
    return texts, scores
