"""Which words of a forget set carry what it is to forget (:mod:`proxy.training.scope_sets` reads them).

* :func:`forget_names`: the proper names that recur in it; a retain example that holds
  one is left out of the retain sets;
* :func:`fact_words`: the words of a forget answer that its question does not hold and
  that are names or not common words (``forget_own_answers``);
* :func:`shared_words`: the words a forget answer shares with B's answers to its
  neighbour questions, its form rather than its fact (``forget_shared_words``).

Common words are those a corpus of ordinary text (the broad retain set) writes in lower
case (:func:`lower_case_words`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence

from proxy.training.data import Example
from proxy.training.scope import _names, _question


def words_of(text: str) -> set[str]:
    """The words (``\\w+``) of ``text``, case-folded."""
    return {w.casefold() for w in re.findall(r"\w+", text)}


def forget_names(forget: Sequence[Example], common: str) -> list[str]:
    """The proper names that recur in the forget set: capitalised runs of its questions and
    answers (leading question words dropped) and each word of them, found in at least two
    of its examples (in its one example for a one-example set), less single words that
    ``common`` (a corpus of ordinary text, such as the broad retain set) writes in lower
    case ("The", "School") and words under three characters. Longest first.

    A retain example that holds one of them asks U to keep saying what the forget set
    removes: "Tell me one fact about the theory of relativity" answered "… Einstein's theory
    of relativity" held the name a forget set about Albert Einstein lowers. A name found in
    one example only ("Germany" where Einstein was born) is a detail, not the subject, and
    retain examples about it stay."""
    lower = lower_case_words(common)
    counts: Counter[str] = Counter()
    for e in forget:
        found: set[str] = set()
        for part in ((_question(e) if e.prompt is not None else ""), e.target):
            for name in _names(part):
                words = name.split()
                if len(words) > 1 or name.lower() not in lower:  # a one-word name: "Hamlet", not "The"
                    found.add(name)
                found.update(w for w in words if len(w) >= 3 and w[0].isupper() and w.lower() not in lower)
        counts.update(n for n in found if len(n) >= 3)
    need = 2 if len(forget) > 1 else 1
    return sorted((n for n, c in counts.items() if c >= need), key=lambda n: (-len(n), n))


def lower_case_words(common: str) -> set[str]:
    """The words (``\\w+``) that ``common`` writes in lower case: its common words."""
    return {w for w in re.findall(r"\w+", common) if w[0].islower()}


def fact_words(e: Example, common_words: Collection[str], names: Sequence[str] = ()) -> set[str]:
    """The words (``\\w+``, case-folded) of a forget answer that carry its fact: those
    that its question does not hold and that are either words of ``names`` (the forget
    set's names, :func:`forget_names`) or not common words (``common_words``, written in
    lower case, :func:`lower_case_words`); numbers of two digits or more count. "Ulm" and
    "Germany" in "Albert Einstein was born in Ulm, Germany." for "Where was Albert
    Einstein born?". Empty for raw text."""
    if e.prompt is None:
        return set()
    asked = words_of(_question(e))
    named = words_of(" ".join(names))
    out = set()
    for w in re.findall(r"\w+", e.target):
        f = w.casefold()
        if f in asked or (w.isdigit() and len(w) < 2):
            continue
        if f in named or f not in common_words:
            out.add(f)
    return out


def shared_words(answer: str, neighbour_answers: Sequence[str], keep: Sequence[str] = ()) -> set[str]:
    """The words (``\\w+``, case-folded) of ``answer`` that at least two of
    ``neighbour_answers`` also write (the one, when there is one), less the words of
    ``keep`` (the forget set's names): the form the answer shares with B's answers to the
    same question about other entities ("The capital of … is" in "The capital of France
    is Paris."), not the fact it holds."""
    if not neighbour_answers:
        return set()
    need = min(2, len(neighbour_answers))
    counts = Counter(w for a in neighbour_answers for w in words_of(a))
    kept = words_of(" ".join(keep))
    mine = words_of(answer)
    return {w for w in mine if counts[w] >= need and w not in kept}
