"""The redaction scorer: input lines read as items, and each output scored teacher-forced
by the served model's local pair, Δ = log p_U(token) − log p_B(token) per local token (nats).

Used by the file runner (:mod:`proxy.redaction.redact`) and by calibration
(:func:`proxy.redaction.spans.calibrate` takes :func:`score_file`'s scores).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from proxy.decoding.served import ServedModel
from proxy.jobs.runner import input_lines
from proxy.protocol.schemas import Message


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


async def score_file(model: ServedModel, inp: str | os.PathLike[str]) -> tuple[list[str], list[Scored]]:
    """Score every valid line of a file (for :func:`proxy.redaction.spans.calibrate`).

    Raises:
        RedactError: a line is not valid, or the model has no offset.
    """
    if not model.uses_offset:
        raise RedactError(f"model {model.name!r} has no offset: there is nothing to score outputs with")
    texts, scores = [], []
    for n, raw in input_lines(Path(inp).read_bytes()):
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
