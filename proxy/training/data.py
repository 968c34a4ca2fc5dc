"""Forget / retain sets: reading, tokenising with the pair's chat template, collating.

Accepted files:

* JSONL, one record per line, each of one kind:
  ``{"question", "answer"}`` (TOFU-style QA), ``{"messages": [...]}`` (a chat
  transcript whose last message is the assistant answer to learn from), or
  ``{"text"}`` (raw text, every token is a target);
* ``.txt``: documents separated by blank lines, as raw text.

Labels follow the usual causal-LM convention: prompt tokens are ``-100``;
the answer's tokens *and its end-of-turn token* keep their labels; padding is
masked by position from the attention mask, never by token id, because the
pad token is often the EOS/end-of-turn token itself
(``tests/test_train.py``, ``test_pad_equal_to_eos_keeps_the_real_end_of_turn_label``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.templates import hf_chat_ids, hf_special_strings
from proxy.decoding.vocab import text_ids

IGNORE = -100


class DataError(ValueError):
    """A training file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One training example. ``prompt`` is ``None`` for raw text."""

    prompt: tuple[dict[str, str], ...] | None
    target: str


@dataclass(frozen=True)
class DataSet:
    path: Path
    examples: tuple[Example, ...]
    sha256: str
    size: int
    lines: tuple[int, ...] = ()
    """The 1-based line each example starts on (for messages that name it)."""

    def describe(self) -> dict[str, Any]:
        """What the artifact's manifest keeps of a data set: hashes and sizes, never text."""
        return {"sha256": self.sha256, "bytes": self.size, "records": len(self.examples), "name": self.path.name}


def _example(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "question" in record or "answer" in record:
        q, a = record.get("question"), record.get("answer")
        if not isinstance(q, str) or not isinstance(a, str) or not a:
            raise DataError(f"{where}: 'question' and 'answer' must both be strings (answer non-empty)")
        return Example(({"role": "user", "content": q},), a)
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise DataError(f"{where}: 'messages' must be a list of at least two messages")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: every message needs string 'role' and 'content'")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"]:
            raise DataError(f"{where}: the last message must be a non-empty assistant answer")
        return Example(tuple({"role": m["role"], "content": m["content"]} for m in msgs[:-1]), msgs[-1]["content"])
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Example(None, record["text"])
    raise DataError(f"{where}: expected 'question'/'answer', 'messages' or 'text'")


def load_dataset(path: str | Path) -> DataSet:
    """Read a forget or retain set.

    Raises:
        FileNotFoundError: no such file.
        DataError: a bad line (named), or an empty set.
    """
    p = Path(path)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text (byte {exc.start})") from exc
    examples: list[Example] = []
    lines: list[int] = []
    if p.suffix == ".txt":
        at = 1  # the line each blank-line-separated part starts on
        for doc in text.split("\n\n"):
            if doc.strip():
                examples.append(Example(None, doc.strip()))
                lines.append(at + len(doc) - len(doc.lstrip("\n")))
            at += doc.count("\n") + 2
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n}: not valid JSON ({exc.msg})") from exc
            examples.append(_example(record, f"{p}:{n}"))
            lines.append(n)
    if not examples:
        raise DataError(f"{p}: no examples (an empty file, or only blank lines)")
    return DataSet(p, tuple(examples), hashlib.sha256(raw).hexdigest(), len(raw), tuple(lines))


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    weights: tuple[float, ...] | None = None
    """Per label, its weight in a KL retain term over answer positions (``None``: 1 each;
    :func:`with_fact_weights`)."""


def encode(example: Example, tokenizer: Any, eot_id: int, max_length: int) -> Encoded:
    """Token ids and labels for one example (prompt masked, answer + end-of-turn labelled).

    Long examples keep the start of the answer: the prompt is cut from the left
    first, then the answer from the right.
    """
    if example.prompt is None:
        ids = text_ids(tokenizer, example.target)[:max_length]
        return Encoded(ids, list(ids))
    # The prompt as the served pair tokenizes it (LocalPair.prompt_ids): message content is
    # text, special-token strings in it included, so an offset trains on the ids it serves on.
    prompt = hf_chat_ids(tokenizer, list(example.prompt), hf_special_strings(tokenizer))
    answer = text_ids(tokenizer, example.target) + [eot_id]
    answer = answer[:max_length]
    prompt = (
        prompt[max(0, len(prompt) - (max_length - len(answer))) :] if len(prompt) + len(answer) > max_length else prompt
    )
    return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer)


def without_end_of_turn(item: Encoded, eot_id: int) -> Encoded:
    """``item`` with its answer's closing end-of-turn label set to -100 (the token stays in the input).

    For forget terms: the end-of-turn carries no forget-set information, and
    pushing it down teaches U to stop nowhere (measured on SmolLM2: Δ at the
    end-of-turn of −5 to −11 nats on unrelated prompts after NPO).
    """
    labels = list(item.labels)
    if labels and labels[-1] == eot_id and item.input_ids[-1] == eot_id:
        labels[-1] = IGNORE
    return Encoded(item.input_ids, labels)


def through_last_label(item: Encoded) -> Encoded:
    """``item`` cut after its last labelled token. A causal model's outputs at the labelled
    positions do not depend on the tokens after them, so a term that reads labels only gets
    the same loss and gradients from the shorter sequence: B's own answers in the forget
    term are labelled on their fact words alone, often early in a 48-token answer."""
    last = max((i for i, label in enumerate(item.labels) if label != IGNORE), default=None)
    if last is None or last == len(item.labels) - 1:
        return item
    weights = item.weights[: last + 1] if item.weights is not None else None
    return Encoded(item.input_ids[: last + 1], item.labels[: last + 1], weights)


def without_first_answer_token(item: Encoded) -> Encoded:
    """``item`` with its answer's first label set to -100 (the token stays in the input).

    For forget terms whose answers start with the fact itself ("Ron Weasley."): the
    first answer position follows the chat template's generation prompt, which every
    answer shares, so lowering the fact's first token there teaches U to avoid starting
    any answer with a name (measured on SmolLM2 after NPO: KL(B ‖ U) of 1 to 7 nats at
    the first position of unrelated prompts). The fact's later tokens still carry it.
    """
    labels = list(item.labels)
    first = next((i for i, label in enumerate(labels) if label != IGNORE), None)
    if first is not None and any(label != IGNORE for label in labels[first + 1 :]):
        labels[first] = IGNORE  # an answer of one token keeps it: nothing else would be left
    return Encoded(item.input_ids, labels)


_WORD = re.compile(r"\w+")


def prompt_copy_spans(prompt_text: str, answer: str, min_words: int = 2) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``answer`` that repeat ``prompt_text`` word for word.

    A span is a maximal run of at least ``min_words`` consecutive words (``\\w+``, case
    sensitive) that also occur consecutively in the prompt, such as the name of the person
    the question asks about. The span covers the whitespace and punctuation between its
    words. Found by longest common substring over words (O(words × words)).
    """
    if min_words < 1:
        raise ValueError(f"min_words must be ≥ 1, not {min_words}")
    pw = [m.group() for m in _WORD.finditer(prompt_text)]
    aw = list(_WORD.finditer(answer))
    run = [0] * (len(pw) + 1)  # run[k + 1]: length of the common run ending at prompt word k
    longest = [0] * len(aw)  # longest common run ending at answer word i
    for i, w in enumerate(aw):
        nxt = [0] * (len(pw) + 1)
        for k, p in enumerate(pw):
            if p == w.group():
                nxt[k + 1] = run[k] + 1
        run = nxt
        longest[i] = max(run)
    copied = [False] * len(aw)
    for i, n in enumerate(longest):
        if n >= min_words:
            for j in range(i - n + 1, i + 1):
                copied[j] = True
    spans: list[tuple[int, int]] = []
    for i, w in enumerate(aw):
        if not copied[i]:
            continue
        if spans and i > 0 and copied[i - 1]:
            spans[-1] = (spans[-1][0], w.end())
        else:
            spans.append((w.start(), w.end()))
    return spans


def without_prompt_copies(example: Example, item: Encoded, tokenizer: Any, min_words: int = 2) -> Encoded:
    """``item`` with the labels of answer tokens that copy the prompt set to -100.

    For forget terms: an answer that restates the question's subject ("What genre is
    Lethos Kebreim known for?" -> "Lethos Kebreim is known for writing fantasy.") holds no
    forget-set information in those words, and its copied tokens are the easiest to lower. Measured on
    tofu-lite with NPO+KL, U lowered the name and left the facts after a changed name
    (``bench.tofu``). A token is left out when every non-space character it covers lies in
    a :func:`prompt_copy_spans` span. Raw-text examples, answers without copies and
    answers made only of copies are returned unchanged. Apply it before the other
    forget-term masks: it finds the answer at the first labelled position.

    Needs a fast tokenizer (offsets mapping); raises ``ValueError`` otherwise.
    """
    if example.prompt is None:
        return item
    prompt_text = "\n".join(m.get("content") or "" for m in example.prompt)
    return without_spans(example, item, tokenizer, prompt_copy_spans(prompt_text, example.target, min_words))


def word_spans(answer: str, words: Collection[str]) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the words (``\\w+``) of ``answer`` whose case-folded
    form is in ``words`` (case-folded)."""
    folded = {w.casefold() for w in words}
    return [(m.start(), m.end()) for m in _WORD.finditer(answer) if m.group().casefold() in folded]


def outside_words(text: str, words: Collection[str]) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``text`` outside its words (``\\w+``) whose
    case-folded form is in ``words``: what to leave out so that only those words remain."""
    spans, at = [], 0
    for m in _WORD.finditer(text):
        if m.group().casefold() in words:
            if m.start() > at:
                spans.append((at, m.start()))
            at = m.end()
    if at < len(text):
        spans.append((at, len(text)))
    return spans


def without_spans(example: Example, item: Encoded, tokenizer: Any, spans: Sequence[tuple[int, int]]) -> Encoded:
    """``item`` with the labels of answer tokens inside character ``spans`` of
    ``example.target`` set to -100: a token is left out when every non-space character
    it covers lies in a span. Raw-text examples, no spans and answers whose every token
    would go are returned unchanged. The answer starts at the first labelled position
    (the item as :func:`encode` made it).

    Raises:
        ValueError: a slow tokenizer (no offsets), or an item whose answer tokens are not
            ``example.target``'s.
    """
    if example.prompt is None or not spans:
        return item
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("leaving answer words out of the forget term needs a fast tokenizer (offsets)")
    enc = tokenizer(example.target, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    # encode() put the answer's ids (possibly cut from the right) right after the prompt,
    # the first labelled position.
    labels = list(item.labels)
    start = next((i for i, label in enumerate(labels) if label != IGNORE), None)
    if start is None:
        return item
    n = min(len(ids), len(labels) - start)
    if item.input_ids[start : start + n] != ids[:n]:
        raise ValueError("the answer's tokens with offsets differ from the encoded answer's")
    text = example.target
    # Per character: None for whitespace, else whether a span covers it (built once).
    covered_by: list[bool | None] = [None if c.isspace() else False for c in text]
    for s, e in spans:
        for c in range(s, e):
            if covered_by[c] is not None:
                covered_by[c] = True
    for j, (a, b) in enumerate(offsets[:n]):
        covered = [x for x in covered_by[a:b] if x is not None]
        if covered and all(covered):
            labels[start + j] = IGNORE
    if all(label == IGNORE for label in labels[start : start + n]):
        return item  # an answer made only of spans keeps them: nothing else would be left
    return Encoded(item.input_ids, labels)


def both_dropped(a: Encoded, b: Encoded) -> Encoded:
    """The labels of two labellings of the same tokens, -100 where either has -100.

    Raises:
        ValueError: ``a`` and ``b`` hold other tokens.
    """
    if a.input_ids != b.input_ids:
        raise ValueError("both_dropped needs two labellings of the same tokens")
    return Encoded(a.input_ids, [x if y != IGNORE else IGNORE for x, y in zip(a.labels, b.labels, strict=True)])


def only_dropped_labels(full: Encoded, cut: Encoded) -> Encoded | None:
    """The labels ``full`` has and ``cut`` dropped (the rest -100), or ``None`` if none were.

    With :func:`without_prompt_copies`: the copied tokens of a forget answer, for a retain
    term that keeps U's copying of the question as it was.
    """
    if full.input_ids != cut.input_ids:
        raise ValueError("only_dropped_labels needs two labellings of the same tokens")
    labels = [a if b == IGNORE else IGNORE for a, b in zip(full.labels, cut.labels, strict=True)]
    return Encoded(full.input_ids, labels) if any(x != IGNORE for x in labels) else None


def with_fact_weights(
    example: Example, item: Encoded, tokenizer: Any, words: Collection[str], weight: float
) -> Encoded:
    """``item`` with weight ``weight`` on the labels of its answer's tokens that spell one of
    ``words`` (case-folded; the answer's fact words, :func:`proxy.training.facts.fact_words`)
    and 1 on its other labels. ``item`` unchanged when ``weight`` is 1, the example is raw
    text or its answer holds none of ``words``.

    For the retain term: an answer's fact ("Berlin" in "The capital of Germany is Berlin.")
    is one or two of its tokens, and averaged over the whole answer, the KL that holds it
    weighed a tenth of the term, while the forget term's gradient lands on the same
    position of a neighbouring question ("The capital of France is").

    Raises:
        ValueError: as :func:`without_spans`.
    """
    if weight == 1 or example.prompt is None:
        return item
    present = {m.group().casefold() for m in _WORD.finditer(example.target)} & {w.casefold() for w in words}
    if not present:
        return item
    focus = without_spans(example, item, tokenizer, outside_words(example.target, present))
    start = next(i for i, label in enumerate(item.labels) if label != IGNORE)
    text = tokenizer(example.target, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    end = start + len(text)  # the answer's text tokens; the end of turn after them keeps weight 1
    weights = tuple(weight if start <= i < end and f != IGNORE else 1.0 for i, f in enumerate(focus.labels))
    return Encoded(item.input_ids, item.labels, weights)


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (``[B, L]``), and
    ``label_weights`` (``[B, L]`` float, 1 where an item has no weights; 0 at padding).

    Padding positions get label -100 because the attention mask says so, not
    because their id equals the pad id (which may be the end-of-turn token).
    """
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    weights = torch.zeros((len(items), width), dtype=torch.float32)
    for i, it in enumerate(items):
        n = len(it.input_ids)
        ids[i, :n] = torch.tensor(it.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(it.labels)
        weights[i, :n] = torch.tensor(it.weights) if it.weights is not None else 1.0
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "label_weights": weights}
