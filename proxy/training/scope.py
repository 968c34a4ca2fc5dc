"""What keeps an offset in scope by default: the broad retain set, neighbours of
the forget set, and the checks of a user's forget and retain files.

* **Broad retain set** (:func:`general_sets`): 432 general prompts across people,
  places, science, culture and everyday tasks, answered by the pair's base model
  B itself (greedy, :data:`GENERAL_MAX_TOKENS` new tokens), so that a KL or NLL
  retain term holds B's own behaviour. It is split by position into a training
  part, a calibration part (τ) and a check part (the self-check). The shipped
  answers are SmolLM2-135M-Instruct's (``bench.make_general_retain``); for
  another base model they are generated on first use and cached, keyed by the
  base weights' sha256.
* **Neighbours** (:func:`neighbour_examples`): the forget set's own questions
  about other entities. The forget set's subjects are the capitalised names that
  recur across its questions (:func:`forget_subjects`); the neighbours are the
  entities of a shipped list nearest to them in B's own hidden states (cosine of
  the mean last-layer state), and B answers the swapped questions at train time.
  An offset damages these first (other writers when one writer is forgotten).
* Retain examples that mention a forget subject are left out of both sets, so
  that no retain answer asks U to keep what the forget set removes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy.common.files import RESOURCES, atomic_write, cache_dir
from proxy.decoding.vocab import ByteVocab
from proxy.pair.artifact import weights_sha256
from proxy.pair.model_files import local_model_dir
from proxy.training.data import DataError, DataSet, Example, load_dataset
from proxy.training.greedy import PairModels, greedy_decode

log = logging.getLogger(__name__)

GENERAL_SPLITS = ("train", "calibration", "check")
GENERAL_FILES = {s: RESOURCES / f"general_{s}.jsonl" for s in GENERAL_SPLITS}
GENERAL_META = RESOURCES / "general_meta.json"
"""``{"base_sha256": ..., "max_new_tokens": ...}``: the model that wrote the shipped answers."""
ENTITIES = RESOURCES / "entities.txt"
#: B's answers are this long at most: the retain term then covers the start of an answer,
#: where an out-of-scope answer first diverges, at a cost a CPU can generate.
GENERAL_MAX_TOKENS = 48


def general_split_of(index: int) -> str:
    """The part of the broad retain set that its ``index``-th prompt belongs to (fixed by position)."""
    return {3: "calibration", 4: "check"}.get(index % 5, "train")


def write_general_sets(parts: dict[str, list[dict[str, str]]], base_sha256: str, folder: Path | None = None) -> None:
    """Write the three parts and their meta file (each atomically) into ``folder`` (default: the package's)."""
    folder = RESOURCES if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in parts.items():
        atomic_write(folder / f"general_{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    meta = {"base_sha256": base_sha256, "max_new_tokens": GENERAL_MAX_TOKENS}
    atomic_write(folder / GENERAL_META.name, json.dumps(meta, indent=2) + "\n")


def _read(path: Path) -> list[Example]:
    return list(load_dataset(path).examples)


def general_sets(model: Any, tokenizer: Any, eot_ids: Sequence[int], base_sha256: str) -> dict[str, list[Example]]:
    """The broad retain set's three parts with answers written by this base model.

    The shipped answers when ``base_sha256`` is the model that wrote them; else B's
    answers generated once (batched greedy decoding, about a minute for a 135M model on
    2 cores) and cached under ``<cache>/general/<sha256[:16]>`` (a file lock makes
    concurrent first runs generate once). Empty answers are left out (a warning counts
    them); a cache that does not read is written again.

    Raises:
        ValueError: the base model answered a whole part with empty answers.
    """
    meta = json.loads(GENERAL_META.read_text())
    if meta["base_sha256"] == base_sha256:
        return {s: _read(GENERAL_FILES[s]) for s in GENERAL_SPLITS}
    from filelock import FileLock

    folder = cache_dir() / "general" / base_sha256[:16]
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        cached = _cached_parts(folder)
        if cached is not None:
            return cached
        log.info("writing the broad retain set's answers with this base model (once; cached in %s)", folder)
        shipped = {s: _read(GENERAL_FILES[s]) for s in GENERAL_SPLITS}
        questions = [e.prompt for s in GENERAL_SPLITS for e in shipped[s]]
        answers = generate_answers(model, tokenizer, eot_ids, [q for q in questions if q is not None])
        it = iter(answers)
        parts = {s: [{"question": _question(e), "answer": next(it)} for e in shipped[s]] for s in GENERAL_SPLITS}
        empty = sum(1 for rows in parts.values() for r in rows if not r["answer"].strip())
        if empty:
            # an answer that is only the end of turn is no training example (data files refuse it)
            log.warning("the base model gave %d empty answers to the broad retain set's questions; left out", empty)
            parts = {s: [r for r in rows if r["answer"].strip()] for s, rows in parts.items()}
            if not all(parts.values()):
                raise ValueError(
                    f"the base model answered none of the broad retain set's {min(parts, key=lambda s: len(parts[s]))} "
                    "questions (empty answers only): it cannot hold its own behaviour; set general_retain off"
                )
        write_general_sets(parts, base_sha256, folder)
    return {s: _read(folder / f"general_{s}.jsonl") for s in GENERAL_SPLITS}


def _cached_parts(folder: Path) -> dict[str, list[Example]] | None:
    """The cached parts in ``folder``, or None where there are none or they do not read (a
    cache written by an earlier version, or damaged: it is written again)."""
    if not (folder / GENERAL_META.name).is_file():
        return None
    try:
        return {s: _read(folder / f"general_{s}.jsonl") for s in GENERAL_SPLITS}
    except (DataError, OSError) as e:
        log.warning("the cached broad retain set in %s does not read (%s); writing it again", folder, e)
        return None


def _question(e: Example) -> str:
    assert e.prompt is not None
    return e.prompt[-1]["content"]


def generate_answers(
    model: Any,
    tokenizer: Any,
    eot_ids: Sequence[int],
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """B's greedy answers (at most :data:`GENERAL_MAX_TOKENS` tokens) to chat ``prompts``
    (``model`` is B, before any adapter is attached); with ``temperature`` > 0, answers
    sampled over B's top :data:`proxy.training.greedy.TOP_K`, reproducibly for a ``seed``."""
    pair = PairModels(model, tokenizer, eot_ids, b=model)
    decoded = greedy_decode(
        pair,
        prompts,
        alpha=0.0,
        threshold=math.inf,
        max_tokens=GENERAL_MAX_TOKENS,
        temperature=temperature,
        seed=seed,
    )
    return [d.text for d in decoded]


def general_answers(ref: str, questions: Sequence[str]) -> tuple[list[str], str]:
    """(B's answers to ``questions``, B's weights sha256) for the packaged or folder model ``ref``."""
    # transformers is imported here, not at the top: importing it takes seconds.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = local_model_dir(ref)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eot = ByteVocab.from_tokenizer(tokenizer).eot_ids
    prompts = [[{"role": "user", "content": q}] for q in questions]
    return generate_answers(model, tokenizer, eot, prompts), weights_sha256(model)


# ------------------------------------------------------------------ subjects and neighbours
_NAME = re.compile(r"[A-Z][\w.'’-]*(?:\s+(?:of|the|de|da|van|von|and|&)?\s*[A-Z0-9][\w.'’-]*)*")
_LEADING = {
    "Who", "What", "Which", "Where", "When", "Why", "How", "Is", "Was", "Are", "Were", "Did", "Does", "Do",
    "Can", "Could", "In", "On", "At", "Name", "Tell", "List", "Give", "Describe", "Explain", "The", "A", "An",
    "Please", "I", "My", "According",
}  # fmt: skip


def _names(text: str) -> list[str]:
    out = []
    for m in _NAME.finditer(text):
        words = m.group().split()
        while words and words[0] in _LEADING:
            words = words[1:]
        name = " ".join(words)
        name = re.sub(r"['’]s$", "", name).rstrip(".'’-")
        if len(name) >= 2:
            out.append(name)
    return out


def forget_subjects(forget: Sequence[Example]) -> list[str]:
    """The names the forget set's questions are about: capitalised runs (leading question
    words dropped) found in at least a quarter of the questions (at least two), longest
    first; with none recurring, the most frequent one. Empty for raw-text sets."""
    questions = [_question(e) for e in forget if e.prompt is not None]
    if not questions:
        return []
    counts = Counter(n for q in questions for n in set(_names(q)))
    if not counts:
        return []
    need = max(2, (len(questions) + 3) // 4) if len(questions) > 1 else 1
    subjects = [n for n, c in counts.items() if c >= need]
    if not subjects:
        subjects = [counts.most_common(1)[0][0]]
    # "Harry" when "Harry Potter" is a subject too adds nothing: keep the longest names
    subjects = [s for s in subjects if not any(s != t and s in t for t in subjects)]
    return sorted(subjects, key=len, reverse=True)


def mentions(text: str, names: Sequence[str], *, cased: bool = False) -> bool:
    """Whether ``text`` names one of ``names``, on word boundaries: case-insensitive, or
    with ``cased`` as written (a proper name, not the common word it may also spell)."""
    flags = 0 if cased else re.IGNORECASE
    return any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text, flags) for n in names)


def nearest_entities(model: Any, tokenizer: Any, name: str, templates: Sequence[str], pool: Sequence[str], n: int) -> list[str]:
    """The ``n`` names of ``pool`` that, swapped for ``name`` in the questions ``templates``
    (each naming it), give the questions nearest to the originals: the cosine of B's mean
    last-layer hidden states over each question's tokens, summed over the templates.

    In context the ranking follows the question's slot ("Who founded Apple?" → Microsoft,
    Google, Samsung, IBM …; "What is the capital of France?" → Germany, Spain, England …);
    the bare names alone ranked by their surface (Apple → Brazil, Rome, Queen …), and the
    neighbours trained on asked questions no one asks ("Who founded Brazil?")."""
    import torch

    def embed(texts: Sequence[str]) -> torch.Tensor:
        out = []
        for k in range(0, len(texts), 64):
            rows = [list(tokenizer.encode(t, add_special_tokens=False)) or [0] for t in texts[k : k + 64]]
            width = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)  # right-padded; the mask hides the padding
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            with torch.no_grad():
                hidden = model(
                    input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
                ).hidden_states[-1]  # the output head runs on one position only
            m = mask.unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1))  # [N, H]
        return torch.cat(out)

    scores = torch.zeros(len(pool))
    for t in templates:
        swapped = [_swap(t, name, other) for other in pool]
        scores += embed(swapped) @ embed([t])[0]
    order = scores.argsort(descending=True).tolist()
    return [pool[i] for i in order[:n]]


def _swap(question: str, name: str, other: str) -> str:
    """``question`` with ``name`` (whole words, any case) replaced by ``other``."""
    return re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", other.replace("\\", r"\\"), question, flags=re.IGNORECASE)


def neighbour_examples(
    model: Any,
    tokenizer: Any,
    eot_ids: Sequence[int],
    forget: Sequence[Example],
    *,
    per_question: int,
    exclude: Sequence[str] = (),
) -> list[tuple[int, Example]]:
    """The forget set's questions with a name swapped for nearby entities, answered by B
    (greedy). The name swapped is the forget set's subject where the question names it
    ("Where was Albert Einstein born?" → "Where was Isaac Newton born?"), else the first
    other name the question holds ("What is the capital of France?" → "... of Germany?"),
    each for the entities nearest to it in the questions that name it (:func:`nearest_entities`). Each question gets
    ``per_question`` different entities; entities named in the forget set (or in ``exclude``)
    are skipped, and so are answers that name a subject. Returns (the index in ``forget`` of
    the question swapped, the neighbour example) pairs."""
    subjects = forget_subjects(forget)
    if per_question < 1:
        return []
    forget_text = " ".join((_question(e) if e.prompt else "") + " " + e.target for e in forget)
    pool = [
        p
        for p in (line.strip() for line in ENTITIES.read_text(encoding="utf-8").splitlines())
        if p and not mentions(forget_text, [p]) and not mentions(p, subjects) and not mentions(p, list(exclude))
    ]
    questions: list[tuple[int, Example, str]] = []
    for index, e in enumerate(forget):
        if e.prompt is None:
            continue
        q = _question(e)
        named = [s for s in subjects if mentions(q, [s])] or [n for n in _names(q) if not mentions(n, subjects)]
        if named:
            questions.append((index, e, named[0]))
    if not questions or not pool:
        return []
    count = min(len(pool), max(8, per_question * 2))
    near: dict[str, list[str]] = {}
    for _, _, name in questions:
        if name not in near:
            templates = [_question(e) for _, e, other in questions if other == name][:3]
            near[name] = nearest_entities(model, tokenizer, name, templates, pool, count)
    swapped: list[tuple[dict[str, str], ...]] = []
    source: list[int] = []
    for i, (index, e, s) in enumerate(questions):
        for j in range(per_question):
            other = near[s][(i * per_question + j) % len(near[s])]
            q = _swap(_question(e), s, other)
            swapped.append((*e.prompt[:-1], {"role": "user", "content": q}) if e.prompt else ())
            source.append(index)
    answers = generate_answers(model, tokenizer, eot_ids, swapped)
    return [
        (i, Example(p, a)) for i, p, a in zip(source, swapped, answers, strict=True) if a and not mentions(a, subjects)
    ]


# ------------------------------------------------------------------ checks of the user's files
def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


def question_key(e: Example) -> str:
    """What makes two examples the same for :func:`check_sets`: the last question (or the
    raw text), NFKC case-folded words only."""
    return _norm(_question(e)) if e.prompt is not None else _norm(e.target)


def check_sets(forget: DataSet, retain: DataSet | None) -> list[str]:
    """Check a forget set against a retain set before anything is trained.

    Returns warnings (each naming the file and line): a forget set of one example, a
    retain set whose script differs from the forget set's.

    Raises:
        DataError: a question (or raw text) in both sets, naming both files and lines.
    """
    warnings = []
    if len(forget.examples) == 1:
        warnings.append(
            f"{forget.path}:{forget.lines[0]}: the forget set has one example; an offset trained on it "
            "is narrow (paraphrases of it may still be answered): add paraphrases or related facts"
        )
    if retain is None:
        return warnings
    seen = {question_key(e): line for e, line in zip(forget.examples, forget.lines, strict=True)}
    for e, line in zip(retain.examples, retain.lines, strict=True):
        if question_key(e) in seen:
            raise DataError(
                f"{retain.path}:{line}: the same question as {forget.path}:{seen[question_key(e)]}; "
                "an example cannot be both forgotten and retained"
            )
    want = _script(" ".join(example_text(e) for e in forget.examples))
    for e, line in zip(retain.examples, retain.lines, strict=True):
        got = _script(example_text(e))
        if want and got and got != want:
            warnings.append(
                f"{retain.path}:{line}: written in {got} script, the forget set in {want}; a retain set in "
                "another language than the forget set barely holds the model's behaviour where the offset acts"
            )
            break
    return warnings


def example_text(e: Example) -> str:
    """An example's prompt contents and answer, as one string (what :func:`mentions` reads)."""
    return (" ".join(m["content"] for m in e.prompt) if e.prompt else "") + " " + e.target


def _script(text: str) -> str | None:
    """The script most of ``text``'s letters are written in (the first word of their Unicode
    names: LATIN, CYRILLIC, CJK, ARABIC, …), or None without letters."""
    counts: Counter[str] = Counter()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            counts[name.split(" ")[0] if name else "OTHER"] += 1
    return counts.most_common(1)[0][0].title() if counts else None
