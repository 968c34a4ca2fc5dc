"""The scope sets of a training run (:class:`ScopeSets`, :func:`build_scope_sets`): what
training adds to the user's retain set (the broad retain set's training part, the
neighbours) and holds out for the self-check, with the forget set's subjects and proper
names left out of them (:mod:`proxy.training.scope` finds them, :mod:`proxy.training.facts`
tells which words carry a fact).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.decoding.vocab import ByteVocab
from proxy.training.config import TrainConfig
from proxy.training.data import DataSet, Example
from proxy.training.facts import fact_words, forget_names, lower_case_words, shared_words, words_of
from proxy.training.scope import (
    example_text,
    forget_subjects,
    general_sets,
    generate_answers,
    mentions,
    neighbour_examples,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScopeSets:
    """What training adds to the user's retain set, and what the self-check holds out."""

    general: list[Example]
    """The broad retain set's training part (empty with ``general_retain`` off)."""
    neighbours: list[Example]
    """The neighbours trained on (three of every four)."""
    calibration: list[Example]
    check: list[Example]
    neighbour_check: list[Example]
    subjects: list[str]
    names: list[str]
    """The forget set's proper names that no retain example of these sets holds (:func:`proxy.training.facts.forget_names`)."""
    shared: dict[int, set[str]]
    """Per forget example (by index), the words its answer shares with B's answers to its
    neighbour questions (:func:`proxy.training.facts.shared_words`); empty unless
    ``forget_shared_words`` is off."""
    own_answers: list[tuple[int, Example, set[str]]]
    """(forget example index, B's own answer to its question, greedy or sampled, the fact
    words it holds) for the answers that hold one (``forget_own_answers``, ``forget_own_samples``)."""
    base_answers: dict[int, str] | None = None
    """B's greedy answers to the forget set's chat questions (by example index), where they
    were generated (``forget_own_answers``): the self-check's guesses of B's answers."""
    common_words: frozenset[str] = frozenset()
    """The words the broad retain set writes in lower case (:func:`proxy.training.facts.lower_case_words`;
    empty without it): what tells an answer's fact words from its common ones."""

    def describe(self) -> dict[str, Any]:
        """The manifest's record of them: counts, never text."""
        return {
            "scope": {
                "retain_added": len(self.general) + len(self.neighbours),
                "neighbours_trained": len(self.neighbours),
                "neighbours_held_out": len(self.neighbour_check),
                "calibration_prompts": len(self.calibration),
                "check_prompts": len(self.check),
                "subjects": len(self.subjects),
                "names": len(self.names),
                "own_answers": len(self.own_answers),
            }
        }


def build_scope_sets(
    cfg: TrainConfig, forget: DataSet, base: Any, tokenizer: Any, vocab: ByteVocab, base_sha: str
) -> ScopeSets:
    """The broad retain set's parts and the neighbours for ``cfg`` (:mod:`proxy.training.scope`).
    General examples that name a forget subject or hold one of the forget set's proper names
    (:func:`proxy.training.facts.forget_names`: "Einstein's theory" in a retain answer held the name
    that a forget set about Albert Einstein removes) are left out, and so are neighbours whose
    answer holds one; every fourth neighbour is held out."""
    subjects = forget_subjects(forget.examples)
    general: dict[str, list[Example]] = {}
    names: list[str] = []
    own_answers: list[tuple[int, Example, set[str]]] = []
    base_answers: dict[int, str] | None = None
    common_words: frozenset[str] = frozenset()
    if cfg.general_retain or cfg.calibrate:
        general = general_sets(base, tokenizer, vocab.eot_ids, base_sha)
        common = " ".join(example_text(e) for v in general.values() for e in v)
        common_words = frozenset(lower_case_words(common))
        names = forget_names(forget.examples, common)

        def clear(e: Example) -> bool:
            text = example_text(e)
            return not mentions(text, subjects) and not mentions(text, names, cased=True)

        general = {k: [e for e in v if clear(e)] for k, v in general.items()}
        if cfg.forget_own_answers:
            base_answers, own_answers = _own_answers(
                forget.examples, base, tokenizer, vocab, common_words, names, cfg.forget_own_samples, cfg.seed
            )
    if cfg.forget_own_answers and not (cfg.general_retain or cfg.calibrate):
        logger.warning(
            "%s: B's own answers are not added to the forget term (forget_own_answers): telling their "
            "fact words from common ones needs the broad retain set (general_retain or calibrate)",
            forget.path,
        )
    neighbours: list[Example] = []
    shared: dict[int, set[str]] = {}
    if cfg.neighbours:
        found = neighbour_examples(base, tokenizer, vocab.eot_ids, forget.examples, per_question=cfg.neighbours)
        found = [(i, e) for i, e in found if not mentions(e.target, names, cased=True)]
        neighbours = [e for _, e in found]
        if not cfg.forget_shared_words:
            answers: dict[int, list[str]] = {}
            for i, e in found:
                answers.setdefault(i, []).append(e.target)
            shared = {i: shared_words(forget.examples[i].target, a, [*subjects, *names]) for i, a in answers.items()}
        if not neighbours:
            logger.warning(
                "%s: no neighbour questions: the forget set's questions share no name to swap "
                "(raw text, or every question about another entity)",
                forget.path,
            )
    return ScopeSets(
        general=general.get("train", []) if cfg.general_retain else [],
        neighbours=[e for i, e in enumerate(neighbours) if i % 4 != 3],
        calibration=general.get("calibration", []),
        check=general.get("check", []),
        neighbour_check=[e for i, e in enumerate(neighbours) if i % 4 == 3],
        subjects=subjects,
        names=names,
        shared=shared,
        own_answers=own_answers,
        base_answers=base_answers,
        common_words=common_words,
    )


def _own_answers(
    forget: Sequence[Example],
    base: Any,
    tokenizer: Any,
    vocab: ByteVocab,
    common_words: Collection[str],
    names: list[str],
    samples: int = 0,
    seed: int = 0,
) -> tuple[dict[int, str], list[tuple[int, Example, set[str]]]]:
    """B's greedy answers to the forget set's chat questions (by example index), and B's
    answers that hold a fact word of their forget answer (:func:`proxy.training.facts.fact_words`),
    with those words: the greedy one, then of ``samples`` answers sampled at T = 1 (over B's
    top :data:`proxy.training.greedy.TOP_K`, seeded) those that differ from it and from each other."""
    chat = [(i, e) for i, e in enumerate(forget) if e.prompt is not None]
    prompts = [e.prompt for _, e in chat if e.prompt is not None]
    answers = generate_answers(base, tokenizer, vocab.eot_ids, prompts)
    sampled: list[list[str]] = [[] for _ in chat]
    if samples:
        drawn = generate_answers(
            base, tokenizer, vocab.eot_ids, [p for p in prompts for _ in range(samples)], temperature=1.0, seed=seed
        )
        for k, text in enumerate(drawn):
            sampled[k // samples].append(text)
    out = []
    for (i, e), answer, extra in zip(chat, answers, sampled, strict=True):
        facts = fact_words(e, common_words, names)
        seen: set[str] = set()
        for text in (answer, *extra):
            said = words_of(text) & facts
            if said and text not in seen:
                out.append((i, Example(e.prompt, text), said))
            seen.add(text)
    return {i: a for (i, _), a in zip(chat, answers, strict=True)}, out
