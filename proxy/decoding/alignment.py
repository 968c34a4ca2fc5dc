"""Δ for remote candidates, in bytes, across tokenizers (docs/concepts.md, "Byte alignment across tokenizers").

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
tokens still to be cached) is scored in **one forward pass** (U and B as its rows, or a pass
each for a full fine-tuned U; :func:`proxy.pair.forward.forward_trees`) with
a tree attention mask over the trunk's KV cache, which is then cropped back.

When the remote and local tokenizers are the same, each accepted token goes
straight into the trunk and the tail stays empty: Δ of every candidate comes
from the next-token distribution at the end of the trunk (the fast path). It
gives the same target distribution q as the general path (``tests/test_alignment.py``).

This module is torch-free: :class:`TreeScorer` is the seam to the models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from proxy.decoding.scope_gate import ScopeGate
from proxy.decoding.vocab import ByteVocab

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

    def score(
        self,
        tree: Tree,
        commit: int,
        need: Sequence[int] | None = None,
        reduce: Callable[[np.ndarray], Any] | None = None,
    ) -> tuple[Any, Any]:
        """Next-token log-probabilities for U and B, float32 or float64: row 0 at the end of the
        current trunk, row ``i + 1`` after node ``i``; all ``1 + len(tree)`` rows
        (``[1 + len(tree), V]``), or only the rows ``need``, in that order
        (``[len(need), V]``). With ``reduce``, ``reduce(rows)`` for each model instead
        of its rows (a pure function: what is read from the rows, so that they need not
        outlive the call). The first ``commit`` nodes (a chain from the trunk) become
        part of the trunk; the rest are forgotten."""
        ...

    def rollback(self, keep: int) -> int:
        """Keep only the first ``keep`` of the nodes the last :meth:`score` committed
        (``0 <= keep <= commit``); the others leave the trunk and its caches. Returns
        how many stay cached (``keep``, or fewer: the caller runs the rest again)."""
        ...


@dataclass
class Aligner:
    """Per-choice alignment state: trunk, tail and the trunk's cached logprobs.

    ``same_tokenizer`` enables the fast path: accepted candidates whose bytes
    are exactly one local token go straight into the trunk.

    A speculative draft is scored ahead of what is committed
    (:meth:`draft_deltas`): the draft's own chain of local tokens enters the
    caches at once, and the next call keeps the part of it that the
    committed text really reached (the rest is rolled back), so accepted
    draft tokens are never run through the models twice.
    """

    vocab: ByteVocab
    scorer: TreeScorer
    same_tokenizer: bool = False
    gate: ScopeGate | None = None
    """The offset's scope gate (:mod:`proxy.decoding.scope_gate`): at a position where it is
    closed on B's row, every candidate's Δ is 0."""
    tail: bytes = b""
    pending: list[int] = field(default_factory=list)
    """Tokens accepted into the trunk but not yet in the KV cache."""
    last_max_abs_delta: float = 0.0
    last_opened: list[bool] | None = None
    """Whether the scope gate was open at each position of the last :meth:`draft_deltas`
    (``None`` without a gate): how the speculative loop sizes its next chunk."""
    n_before_ahead: int = 0
    """How many tokens the last draft's score committed before its own chain (pending ones)."""
    chain: list[int] = field(default_factory=list)
    """Every token the last draft's score committed (pending ones, then the draft's chain)."""

    def _advance(self, tail: bytes, data: bytes) -> tuple[list[int], bytes]:
        """Committing ``data`` after ``tail``: the tokens that join the trunk, and the new tail.

        Raises:
            ValueError: the local tokenizer cannot represent the bytes.
        """
        if self.same_tokenizer and not tail and data in self.vocab.exact:
            return [self.vocab.exact[data]], b""
        tail += data
        ids = self.vocab.encode(tail)
        if len(ids) > 1:
            return list(ids[:-1]), tail[len(self.vocab.bytes_of(ids[:-1])) :]
        return [], tail

    def _path(self, data: bytes | None, tail: bytes) -> tuple[tuple[int, ...], bytes | int]:
        """Path tokens and final piece (cover prefix bytes, or an exact id for EOT)."""
        if data is EOT:
            return tuple(self.vocab.encode(tail)), self.vocab.eot_ids[0]
        s = tail + data
        if not tail and (self.same_tokenizer or len(s) == 1):
            return (), s
        ids = self.vocab.encode(s)
        return tuple(ids[:-1]), self.vocab.token_bytes[ids[-1]] or b""

    @property
    def ahead(self) -> list[int]:
        """Chain tokens of the last draft that sit in the caches beyond the committed trunk."""
        return self.chain[self.n_before_ahead :]

    def _settle(self) -> None:
        """Keep the part of the last draft's chain that the commits since reached."""
        ahead = self.ahead
        if not ahead:
            return
        keep = 0
        while keep < min(len(ahead), len(self.pending)) and ahead[keep] == self.pending[keep]:
            keep += 1
        cached = self.scorer.rollback(self.n_before_ahead + keep)
        self.pending = self.chain[cached : self.n_before_ahead + keep] + self.pending[keep:]
        self.chain, self.n_before_ahead = [], 0

    def deltas(self, candidates: Sequence[bytes | None]) -> np.ndarray:
        """Δ for each candidate (bytes, or :data:`EOT`), float64 ``[k]``, nats.

        A candidate whose bytes the local tokenizer cannot represent (a byte
        with no token) has prefix probability 0 under both models; it gets
        Δ = −inf, i.e. probability 0 in q, and is logged.
        """
        return self.draft_deltas([], [candidates])[0]

    def next_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The pair's own next-token log-probabilities after the committed text, U's and
        B's (``[V]`` each, nats, the scorer's float type), or ``None`` when the committed text ends inside
        a local token (a non-empty tail: the next remote token does not start a local
        one). The trunk's pending tokens enter the caches now instead of at the next
        :meth:`draft_deltas`, which then reads this row from the cache.

        Raises:
            ValueError: nothing committed yet (no prompt).
        """
        if self.tail:
            return None
        self._settle()
        n = len(self.pending)
        tree = Tree(tuple(self.pending), tuple(range(-1, n - 1)))
        lp_u, lp_b = self.scorer.score(tree, commit=n, need=[n])
        self.pending = []
        if self.gate is not None and not self.gate.open(lp_b[0][None, :])[0]:
            return lp_b[0], lp_b[0]
        return lp_u[0], lp_b[0]

    def draft_deltas(self, chain: Sequence[bytes], candidates: Sequence[Sequence[bytes | None]]) -> list[np.ndarray]:
        """Δ at every position of a draft, in one forward pass of the pair.

        ``candidates[j]`` (bytes, or :data:`EOT`) are the remote's candidates
        after the committed text followed by ``chain[:j]`` (the drafted bytes);
        ``len(chain) == len(candidates) - 1``. Returns one float64 ``[k_j]``
        array (nats) per position, as :meth:`deltas` would give after committing
        ``chain[:j]``; fewer positions when a drafted piece has bytes the local
        tokenizer cannot represent (the positions after it are not scored: that
        piece has Δ = −inf, so a draft never gets past it). The committed text
        does not change: :meth:`commit` the accepted pieces afterwards.
        """
        if len(chain) != len(candidates) - 1:
            raise ValueError("a draft needs one candidate list per position: len(chain) == len(candidates) - 1")
        self._settle()
        # Where each position starts: chain tokens from the committed trunk, and the tail there.
        extra: list[int] = []
        starts = [(0, self.tail)]
        tail = self.tail
        for data in chain:
            try:
                add, tail = self._advance(tail, data)
            except ValueError:
                break
            extra.extend(add)
            starts.append((len(extra), tail))
        # Trie: pending + chain tokens first (a chain from the trunk), then every candidate path.
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for tok in [*self.pending, *extra]:
            index[(len(tokens) - 1, tok)] = len(tokens)
            parents.append(len(tokens) - 1)
            tokens.append(tok)
        n_chain = len(tokens)
        jobs: list[tuple[int, int, list[tuple[tuple[int, ...], bytes | int]], list[int], list[int]]] = []
        for (n_extra, tail), cands in zip(starts, candidates, strict=False):
            root = len(self.pending) + n_extra - 1  # node after which this position's paths start
            paths: list[tuple[tuple[int, ...], bytes | int]] = []
            unrepresentable: list[int] = []
            for i, c in enumerate(cands):
                try:
                    paths.append(self._path(c, tail))
                except ValueError as exc:
                    log.warning("candidate %r left out of q: %s", c, exc)
                    unrepresentable.append(i)
                    paths.append(((), self.vocab.eot_ids[0]))  # a placeholder, overwritten below
            if tail:  # scored too, for -log P(r | trunk)
                paths.append(self._path(b"", tail))
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
            jobs.append((root, len(cands), paths, ends, unrepresentable))
        # Rows read below: after each position's root and after every node on a candidate path.
        need: set[int] = set()
        for root, _, paths, ends, _ in jobs:
            need.add(root + 1)
            for (path, _), end in zip(paths, ends, strict=True):
                node = root
                for tok in path:
                    need.add(node + 1)
                    node = index[(node, tok)]
                need.add(end + 1)
        rows = sorted(need)
        row_of = {r: j for j, r in enumerate(rows)}
        offsets = np.cumsum([0] + [len(ends) for _, _, _, ends, _ in jobs])

        gate = self.gate

        def path_logps(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            """One model's log-probability of each path and final piece, float64, in job order,
            and whether the scope gate is open on this model's row at each position's root
            (read from B's rows only)."""
            opened = gate.open(lp[[row_of[root + 1] for root, *_ in jobs]]) if gate is not None else None
            logp = np.empty(offsets[-1])
            i = 0
            for root, _, paths, ends, _ in jobs:
                for (path, final), end in zip(paths, ends, strict=True):
                    total = 0.0
                    node = root
                    for tok in path:
                        total += lp[row_of[node + 1], tok]
                        node = index[(node, tok)]
                    logp[i] = total + self._final(lp[row_of[end + 1]], final)
                    i += 1
            return logp, opened

        # The rows are read inside the pair's pass (``reduce``): a draft's are 19 MB per model.
        (logp_u, _), (logp_b, opened) = self.scorer.score(
            Tree(tuple(tokens), tuple(parents)), commit=n_chain, need=rows, reduce=path_logps
        )
        self.last_opened = None if opened is None else [bool(o) for o in opened]
        self.n_before_ahead = len(self.pending)
        self.chain = tokens[:n_chain]
        self.pending = []
        out: list[np.ndarray] = []
        for j, ((_, k, _, _, unrepresentable), (_, tail)) in enumerate(zip(jobs, starts, strict=False)):
            span = slice(offsets[j], offsets[j + 1])
            with np.errstate(invalid="ignore"):  # −inf − (−inf): NaN, handled below
                delta = logp_u[span] - logp_b[span]
            delta = delta[:k] - delta[k] if tail else delta[:k]
            delta[unrepresentable] = -np.inf
            delta[np.isnan(delta)] = -np.inf  # probability 0 under both models: not in q
            if opened is not None and not opened[j]:  # out of the gate's scope: no offset
                delta[np.isfinite(delta)] = 0.0
            out.append(delta)
        finite = np.concatenate([d[np.isfinite(d)] for d in out]) if out else np.empty(0)
        self.last_max_abs_delta = float(np.max(np.abs(finite))) if finite.size else 0.0
        return out

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
        """Accept a candidate (bytes, or :data:`EOT`) into the committed text.

        Raises:
            ValueError: the local tokenizer cannot represent the bytes.
        """
        if data is EOT:
            return
        add, self.tail = self._advance(self.tail, data)
        self.pending.extend(add)
