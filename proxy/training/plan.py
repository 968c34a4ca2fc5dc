"""The step plan of a training run (:class:`Plan`): which forget, retain and "I don't
know" items each optimizer step sees, a function of (seed, epoch) only, so that a run
resumed from a checkpoint sees the same batches; and how the plan is built from the
forget set, the user's retain set and the scope sets (:func:`build_plan`: which labels
of a forget answer the forget term keeps, which ride in the retain term instead).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from proxy.common.files import RESOURCES
from proxy.decoding.vocab import ByteVocab
from proxy.training.config import TrainConfig
from proxy.training.data import (
    DataSet,
    Encoded,
    Example,
    both_dropped,
    collate,
    encode,
    only_dropped_labels,
    outside_words,
    through_last_label,
    with_fact_weights,
    without_end_of_turn,
    without_first_answer_token,
    without_prompt_copies,
    without_spans,
    word_spans,
)
from proxy.training.facts import fact_words, words_of
from proxy.training.objectives import Batches, Objective
from proxy.training.scope_sets import ScopeSets

IDK_FILE = RESOURCES / "idk.jsonl"


@dataclass
class Plan:
    """Deterministic batches: a function of (seed, epoch, index) only."""

    forget: list[Encoded]
    retain: list[Encoded]
    idk: list[Encoded]
    batch_size: int
    retain_batch_size: int
    seed: int
    pad_id: int
    pinned: list[Encoded | None] = field(default_factory=list)
    """Per forget item, retain-term labels on its own tokens (or None), added to the
    retain batch of the step that has that item (:func:`proxy.training.data.only_dropped_labels`)."""
    near: int = 0
    """``retain[:near]`` are the near retain examples, ``retain[near:]`` the broad ones."""
    near_share: float = 0.5
    """With both parts non-empty, ``round(near_share · retain_batch_size)`` (at least 1, at
    most all but one) of each step's retain examples come from the near part and the rest
    from the broad part, each part cycled through in a fresh permutation per pass over it,
    counted over the whole run. Otherwise one permutation of the retain set per epoch."""
    companions: list[list[int]] = field(default_factory=list)
    """Per forget example of the user's set (the first ``len(companions)`` of ``forget``),
    the indices of further forget items that ride in the same step (B's own answers to its
    question, ``forget_own_answers``). Empty: every forget item is an example of its own."""
    cross: list[list[int]] = field(default_factory=list)
    """Per forget example of the user's set, the indices of further forget items that ask
    its question with another forget example's answer (``forget_cross_answers``, :func:`cross_answers`);
    ``cross_per_epoch`` of them ride in its step each epoch, in turn."""
    cross_per_epoch: int = 0
    per_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        self.per_epoch = math.ceil(self.primary / self.batch_size)

    @property
    def primary(self) -> int:
        """How many forget items the epochs are over (the rest ride with them)."""
        if self.companions:
            return len(self.companions)
        return len(self.cross) if self.cross else len(self.forget)

    def _cycled(self, start: int, size: int, quota: int, step: int) -> list[int]:
        """``quota`` indices of ``retain[start : start + size]`` for optimizer step ``step``
        (over the whole run): positions ``step·quota …`` of an endless sequence of
        permutations of the part, the ``c``-th seeded by (seed, start, c)."""
        perms: dict[int, list[int]] = {}  # one permutation per pass over the part
        out = []
        for pos in range(step * quota, (step + 1) * quota):
            cycle, at = divmod(pos, size)
            if cycle not in perms:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + start) * 100_003 + cycle)
                perms[cycle] = torch.randperm(size, generator=g).tolist()
            out.append(start + perms[cycle][at])
        return out

    def batches(self, epoch: int) -> Iterator[Batches]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.primary, generator=g).tolist()
        r_order = torch.randperm(len(self.retain), generator=g).tolist() if self.retain else []
        rb = self.retain_batch_size
        mixed = 0 < self.near < len(self.retain)
        near_quota = min(rb - 1, max(1, round(self.near_share * rb)))
        for k in range(self.per_epoch):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            retain = None
            if self.retain:
                if mixed and rb > 1:
                    step = epoch * self.per_epoch + k
                    r_idx = [
                        *self._cycled(0, self.near, near_quota, step),
                        *self._cycled(self.near, len(self.retain) - self.near, rb - near_quota, step),
                    ]
                else:
                    r_idx = [r_order[(k * rb + j) % len(r_order)] for j in range(rb)]
                pins = [p for i in idx if self.pinned and (p := self.pinned[i]) is not None]
                retain = collate([*(self.retain[i] for i in r_idx), *pins], self.pad_id)
            rows = [
                *idx,
                *(j for i in idx for j in (self.companions[i] if self.companions else ())),
                *(j for i in idx for j in self._cross(i, epoch)),
            ]
            idk = collate([self.idk[i] for i in rows], self.pad_id) if self.idk else None
            yield Batches(collate([self.forget[i] for i in rows], self.pad_id), retain, idk)

    def _cross(self, i: int, epoch: int) -> list[int]:
        """The cross items of primary example ``i`` in ``epoch``: ``cross_per_epoch`` of
        ``cross[i]``, from position ``epoch · cross_per_epoch`` on, cyclically."""
        if not self.cross or not self.cross[i] or not self.cross_per_epoch:
            return []
        mine = self.cross[i]
        count = min(self.cross_per_epoch, len(mine))
        return [mine[(epoch * self.cross_per_epoch + k) % len(mine)] for k in range(count)]


#: At most this many cross answers per forget example (the next ones of the forget set,
#: cyclically): a large forget set's steps stay as long as a small one's.
CROSS_CANDIDATES = 16


def cross_answers(
    forget: Sequence[Example],
    own: Sequence[tuple[int, Example, set[str]]],
    common_words: Collection[str],
    names: Sequence[str],
    limit: int = CROSS_CANDIDATES,
) -> list[list[tuple[Example, set[str]]]]:
    """Per forget example ``i``, its question answered with other forget examples'
    answers, each with the forget set's fact words it holds, which example ``i``'s question
    does not (the words the forget term keeps).

    The answer of example ``j`` is B's own statement of its fact (its first answer in
    ``own``, B's greedy one where that holds a fact word), else the user's. ``j`` runs over
    the examples after ``i``, cyclically, until ``limit`` answers are found; an answer
    already found, or whose fact words are all example ``i``'s own, is skipped; raw-text
    examples are neither asked nor answers.
    The fact words are the union over the forget set of
    :func:`proxy.training.facts.fact_words`.

    Why: with one forget answer lowered, the offset's answer to its question fell to the
    next most likely name in the same context, which was often another forget example's
    fact ("Harry Potter's closest friends are none other than the infamous Professor
    Dumbledore", from an offset that forgets the headmaster's name in the headmaster's
    question only).
    """
    facts: set[str] = set()
    for e in forget:
        facts |= fact_words(e, common_words, names)
    first: dict[int, str] = {}
    for j, stated, _ in own:
        first.setdefault(j, stated.target)
    chat = [i for i, e in enumerate(forget) if e.prompt is not None]
    out: list[list[tuple[Example, set[str]]]] = [[] for _ in forget]
    for pos, i in enumerate(chat):
        prompt = forget[i].prompt
        assert prompt is not None
        asked = words_of(prompt[-1]["content"])
        mine = fact_words(forget[i], common_words, names)
        seen: set[str] = set()
        for step in range(1, len(chat)):
            if len(out[i]) >= limit:
                break
            j = chat[(pos + step) % len(chat)]
            text = first.get(j, forget[j].target)
            words = (words_of(text) & facts) - asked
            if words and not words <= mine and text not in seen:  # not example i's own fact again
                out[i].append((Example(prompt, text), words))
            seen.add(text)
    return out


def _idk_answers() -> list[str]:
    return [json.loads(line)["answer"] for line in IDK_FILE.read_text().splitlines() if line.strip()]


def build_plan(
    cfg: TrainConfig,
    objective: Objective,
    forget_set: DataSet,
    retain_set: DataSet | None,
    scope: ScopeSets,
    tokenizer: Any,
    vocab: ByteVocab,
) -> Plan:
    """The :class:`Plan` of a run with ``cfg``: the forget set's items with the labels the
    forget term keeps (``forget_prompt_copies``, ``forget_shared_words``,
    ``forget_end_of_turn``, ``forget_first_token``), B's own answers riding with their
    forget example (``forget_own_answers``), the near retain examples (the user's retain
    set, then the trained neighbours) before the broad retain set, their fact words
    weighing ``retain_fact_weight`` in the retain term, and the "I don't know" answers for
    DPO."""
    eot = vocab.eot_ids[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot

    def enc(examples: tuple[Example, ...] | list[Example]) -> list[Encoded]:
        return [encode(e, tokenizer, eot, cfg.max_length) for e in examples]

    near_examples = [*(retain_set.examples if retain_set else ()), *scope.neighbours]
    retain_examples = [*near_examples, *scope.general]

    idk: list[Encoded] = []
    if cfg.objective == "DPO":
        answers = _idk_answers()
        idk = enc([Example(e.prompt, answers[i % len(answers)]) for i, e in enumerate(forget_set.examples)])
    forget_items = full_items = enc(forget_set.examples)
    pinned: list[Encoded | None] = []
    if not cfg.forget_prompt_copies:  # first: it finds each answer at its first label
        cut = [without_prompt_copies(e, it, tokenizer) for e, it in zip(forget_set.examples, forget_items, strict=True)]
        if cfg.pin_prompt_copies and objective.retain_on_labels and retain_examples:
            # The copies join the retain term of the step that has their forget example,
            # so U keeps copying the question's name while it lowers what follows.
            pinned = [only_dropped_labels(f, c) for f, c in zip(forget_items, cut, strict=True)]
        forget_items = cut
    if not cfg.forget_shared_words and scope.shared:
        forget_items = [
            both_dropped(it, without_spans(e, full, tokenizer, word_spans(e.target, scope.shared.get(i, set()))))
            for i, (e, it, full) in enumerate(zip(forget_set.examples, forget_items, full_items, strict=True))
        ]
    forget_items = list(forget_items)

    def ride(i: int, example: Example, words: set[str]) -> int:
        """Add ``example`` labelled on ``words`` alone, riding in forget example ``i``'s step; its index."""
        item = encode(example, tokenizer, eot, cfg.max_length)
        forget_items.append(without_spans(example, item, tokenizer, outside_words(example.target, words)))
        if idk:
            idk.append(idk[i])
        if pinned:
            pinned.append(None)
        return len(forget_items) - 1

    companions: list[list[int]] = [[] for _ in forget_items] if scope.own_answers else []
    for i, own, words in scope.own_answers:
        companions[i].append(ride(i, own, words))  # B's own statement of example i's fact
    cross: list[list[int]] = []
    if cfg.forget_cross_answers and scope.common_words:
        found = cross_answers(forget_set.examples, scope.own_answers, scope.common_words, scope.names)
        cross = [[ride(i, answer, words) for answer, words in mine] for i, mine in enumerate(found)]
    if not cfg.forget_end_of_turn:
        forget_items = [without_end_of_turn(it, eot) for it in forget_items]
    if not cfg.forget_first_token:
        forget_items = [without_first_answer_token(it) for it in forget_items]
    forget_items = [through_last_label(it) for it in forget_items]  # the forget term reads labels only
    retain_items = enc(retain_examples)
    if cfg.retain_fact_weight != 1 and scope.common_words and cfg.positions() == "answer":
        retain_items = [
            with_fact_weights(e, it, tokenizer, fact_words(e, scope.common_words), cfg.retain_fact_weight)
            for e, it in zip(retain_examples, retain_items, strict=True)
        ]
    return Plan(
        forget_items,
        retain_items,
        idk,
        cfg.batch_size,
        cfg.retain_batch_size or cfg.batch_size,
        cfg.seed,
        pad,
        pinned,
        near=len(near_examples),
        near_share=cfg.near_share,
        companions=companions,
        cross=cross,
        cross_per_epoch=cfg.forget_cross_answers,
    )
