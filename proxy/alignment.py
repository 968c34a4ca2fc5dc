"""Δ for remote candidates, in bytes, across tokenizers (DESIGN.md, "Token alignment").

For a candidate continuation ``c`` (bytes) the offset is

    Δ(c) = log P_U(c | x, y<t) − log P_B(c | x, y<t)                (δ-unlearning, arXiv 2404.11045, Eq. 2)

where ``P_m(c | ·)`` is the probability that model ``m`` continues with text
*starting with* the bytes ``c``. The committed text is split into a local
*trunk* (tokens fixed for good, in the KV cache) and a *tail* ``r`` (bytes
after it), and

    log P_m(c | ·) = log P_m(r + c | trunk) − log P_m(r | trunk).

``P_m(s | trunk)`` follows the canonical local tokenisation of ``s``,
``t_1 … t_n``: the path ``t_1 … t_{n−1}`` is scored token by token and the
last piece by the mass of every local token whose bytes start with
``bytes(t_n)`` (a *cover*), so that a candidate that is a prefix of others,
or ends inside a local token or a UTF-8 character, gets its full prefix
probability. Paths of all candidates form a trie; the trie (after any trunk
tokens still to be cached) is scored in **one forward pass per model** with
a tree attention mask over the trunk's KV cache, which is then cropped back.

When the remote and local tokenizers are the same, each accepted token goes
straight into the trunk and the tail stays empty: Δ of every candidate comes
from the next-token distribution at the end of the trunk (the fast path). It
gives the same target distribution q as the general path (``tests/test_alignment.py``).

This module is torch-free: :class:`TreeScorer` is the seam to the models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .vocab import ByteVocab

log = logging.getLogger(__name__)

#: A candidate for :meth:`Aligner.deltas`: its bytes, or ``None`` for end-of-turn.
EOT = None


@dataclass(frozen=True, slots=True)
class Tree:
    """Tokens to score after the trunk, as a forest flattened in order.

    ``parents[i]`` is the index of node ``i``'s parent (``-1``: the trunk).
    Every parent precedes its children.
    """

    tokens: tuple[int, ...]
    parents: tuple[int, ...]


class TreeScorer(Protocol):
    """Scores a :class:`Tree` after the trunk under both models of the pair."""

    def score(self, tree: Tree, commit: int) -> tuple[np.ndarray, np.ndarray]:
        """Next-token log-probabilities for U and B, each ``[1 + len(tree), V]``
        float64: row 0 at the end of the current trunk, row ``i + 1`` after node
        ``i``. The first ``commit`` nodes (a chain from the trunk) become part
        of the trunk; the rest are forgotten."""
        ...


@dataclass
class Aligner:
    """Per-choice alignment state: trunk, tail and the trunk's cached logprobs.

    ``same_tokenizer`` enables the fast path: accepted candidates whose bytes
    are exactly one local token go straight into the trunk.
    """

    vocab: ByteVocab
    scorer: TreeScorer
    same_tokenizer: bool = False
    tail: bytes = b""
    pending: list[int] = field(default_factory=list)
    """Tokens accepted into the trunk but not yet in the KV cache."""
    last_max_abs_delta: float = 0.0

    def _path(self, data: bytes | None) -> tuple[tuple[int, ...], bytes | int]:
        """Path tokens and final piece (cover prefix bytes, or an exact id for EOT)."""
        if data is EOT:
            return tuple(self.vocab.encode(self.tail)), self.vocab.eot_ids[0]
        s = self.tail + data
        if not self.tail and (self.same_tokenizer or len(s) == 1):
            return (), s
        ids = self.vocab.encode(s)
        return tuple(ids[:-1]), self.vocab.token_bytes[ids[-1]] or b""

    def deltas(self, candidates: Sequence[bytes | None]) -> np.ndarray:
        """Δ for each candidate (bytes, or :data:`EOT`), float64 ``[k]``, nats.

        A candidate whose bytes the local tokenizer cannot represent (a byte
        with no token) has prefix probability 0 under both models; it gets
        Δ = −inf, i.e. probability 0 in q, and is logged.
        """
        paths: list[tuple[tuple[int, ...], bytes | int]] = []
        unrepresentable: list[int] = []
        for i, c in enumerate(candidates):
            try:
                paths.append(self._path(c))
            except ValueError as exc:
                log.warning("candidate %r left out of q: %s", c, exc)
                unrepresentable.append(i)
                paths.append(((), self.vocab.eot_ids[0]))  # a placeholder, overwritten below
        if self.tail:  # scored too, for -log P(r | trunk)
            paths.append(self._path(b""))
        # Trie over pending trunk tokens + every path.
        chain = list(self.pending)
        tokens: list[int] = []
        parents: list[int] = []
        for tok in chain:
            parents.append(len(tokens) - 1)
            tokens.append(tok)
        root = len(tokens) - 1  # node after which candidate paths start (-1: trunk)
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        ends: list[int] = []
        for path, _ in paths:
            node = root
            for tok in path:
                key = (node, tok)
                if key not in index:
                    index[key] = len(tokens)
                    parents.append(node)
                    tokens.append(tok)
                node = index[key]
            ends.append(node)
        lp_u, lp_b = self.scorer.score(Tree(tuple(tokens), tuple(parents)), commit=len(chain))
        self.pending = []
        # Log-probability of each path + final piece, for both models.
        out = np.empty((len(ends), 2))
        for j, ((path, final), end) in enumerate(zip(paths, ends, strict=True)):
            for m, lp in enumerate((lp_u, lp_b)):
                total = 0.0
                node = root
                for tok in path:
                    total += lp[node + 1, tok]
                    node = index[(node, tok)]
                out[j, m] = total + self._final(lp[end + 1], final)
        delta = out[:, 0] - out[:, 1]
        k = len(candidates)
        delta = delta[:k] - delta[k] if self.tail else delta[:k]
        delta[unrepresentable] = -np.inf
        delta[np.isnan(delta)] = -np.inf  # probability 0 under both models: not in q
        finite = delta[np.isfinite(delta)]
        self.last_max_abs_delta = float(np.max(np.abs(finite))) if finite.size else 0.0
        return delta

    def _final(self, row: np.ndarray, final: bytes | int) -> float:
        if isinstance(final, int):
            return float(row[final])
        lo, hi = self.vocab.cover_range(final)
        if lo == hi:
            return -np.inf
        vals = row[self.vocab.sorted_ids[lo:hi]]
        top = vals.max()
        if not np.isfinite(top):
            return float(top)
        return float(top + np.log(np.exp(vals - top).sum()))

    def commit(self, data: bytes | None) -> None:
        """Accept a candidate (bytes, or :data:`EOT`) into the committed text."""
        if data is EOT:
            return
        if self.same_tokenizer and not self.tail and data in self.vocab.exact:
            self.pending.append(self.vocab.exact[data])
            return
        self.tail += data
        ids = self.vocab.encode(self.tail)
        if len(ids) > 1:
            self.pending.extend(ids[:-1])
            self.tail = self.tail[len(self.vocab.bytes_of(ids[:-1])) :]
