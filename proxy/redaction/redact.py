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
on. Resumable like :mod:`proxy.jobs.batch` (:class:`proxy.jobs.runner.LineRunner`).

Modes: ``mask`` replaces every span with a marker; ``regenerate`` keeps the
text before the first span and lets the proxy (remote + offset) write the
rest. ``calibrate`` picks T for a target false-positive rate: the fraction
of characters flagged in outputs that hold no forget-set content.

This module runs files; the scoring is :mod:`proxy.redaction.scoring`, the
spans, masking and calibration :mod:`proxy.redaction.spans`.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from adapters.base import Context
from proxy.common.literals import RedactionMode
from proxy.decoding.served import ServedModel
from proxy.jobs.ray_engine import RaySettings, WorkerFactory
from proxy.jobs.runner import LineRunner, OnRay, OutputError, answer_key, input_lines
from proxy.protocol.errors import from_exception
from proxy.redaction.scoring import Item, RedactError, parse_item, score
from proxy.redaction.spans import MARKER, flag_spans, mask


def _key(obj: dict[str, Any]) -> str:
    """What identifies an output line's input line: its id, or for an error line its line number."""
    return answer_key(obj, "id")


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
    ray: tuple[RaySettings, WorkerFactory] | None = None,
) -> dict[str, int]:
    """Redact every line of ``inp`` not yet in ``out``; returns counts.

    With ``ray``, the lines are redacted on Ray (:mod:`proxy.jobs.ray_engine`) with these
    settings, each worker built by the factory (``proxy.cli.workers.RedactWorker``, which
    calls :func:`redact_one` with the same model, threshold and mode).

    Raises:
        RedactError: no offset to score with, a bad mode or threshold, an output
            that belongs to another input, or one that another run is writing.
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
    for n, raw in input_lines(data):
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
    runner: LineRunner[Item | dict[str, Any]] = LineRunner(
        out, data, item_key=_item_key, line_key=_key, exclusive=True
    )
    try:
        done = {_key(o) for o in runner.open(items)}
    except OutputError as exc:
        raise RedactError(str(exc)) from exc
    counts = {"total": len(items), "redacted": 0, "clean": 0, "failed": 0, "skipped": len(done)}

    async def answer(item: Item | dict[str, Any]) -> dict[str, Any]:
        return item if isinstance(item, dict) else await redact_one(model, item, threshold, mode, marker, max_tokens)

    def count(line: dict[str, Any]) -> None:
        counts["failed" if "error" in line else "redacted" if line["spans"] else "clean"] += 1

    await runner.run(
        answer,
        counts=lambda: {"input": str(inp), **counts},
        bar=tqdm(total=len(items), initial=len(done), unit="line", disable=not progress, desc="redact"),
        on_line=count,
        ray=None if ray is None else OnRay(ray[0], ray[1], item_payload),
    )
    return counts


def item_payload(item: Item | dict[str, Any]) -> dict[str, Any] | None:
    """What a Ray worker redacts for an input line (:func:`item_of` reads it back); ``None``
    for a line already answered with its error."""
    return None if isinstance(item, dict) else asdict(item)


def item_of(payload: dict[str, Any]) -> Item:
    """The :class:`Item` that :func:`item_payload` wrote."""
    return Item(**payload)


async def redact_one(
    model: ServedModel, item: Item, threshold: float, mode: str, marker: str, max_tokens: int
) -> dict[str, Any]:
    """The output line for one item: its flagged spans and the masked or regenerated text, or
    an error line (``unscorable``, or the regeneration's error) that lets the run go on."""
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
        keep = item.output[: spans[0]["start"]]
        ctx = Context(
            messages=tuple(item.messages) if item.messages is not None else None,
            prompt=item.prompt,
            assistant_prefix=keep.encode(),
        )
        params = model.sampling_params(max_tokens)
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
