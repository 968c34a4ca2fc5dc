"""The pair's scorer of one generated choice: :class:`PairScorer` keeps the trunk's KV cache
for U and for B and scores trees of candidate tokens after it (tree attention), the torch
side of :class:`proxy.decoding.alignment.TreeScorer`; its passes run through the pair's
:class:`proxy.pair.batcher.TreeBatcher` and start from the pair's
:class:`proxy.pair.prefix_cache.PrefixCache` where a prompt's head is cached."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from adapters.base import ContextExhausted
from proxy.decoding.alignment import Tree
from proxy.decoding.scope_gate import ScopeGate
from proxy.pair.batcher import TreeBatcher, TreeJob
from proxy.pair.prefix_cache import PrefixCache
from proxy.pair.sides import Side, sides


class ScoredPair(Protocol):
    """What a :class:`PairScorer` uses of its pair: :class:`proxy.pair.local.LocalPair`."""

    @property
    def max_length(self) -> int: ...
    @property
    def has_offset(self) -> bool: ...
    @property
    def prefix_cache(self) -> PrefixCache | None: ...
    @property
    def batcher(self) -> TreeBatcher: ...
    @property
    def lazy_u(self) -> bool:
        """Whether U's rows are computed only where the scope gate opens (:class:`PairScorer`)."""


#: An answer's first tree from this many tokens on runs B first under the scope gate
#: (:class:`PairScorer`): such a pass costs its positions' products more than a read of the
#: weights, so that U's rows in a pass of their own cost little more than as rows of B's
#: where the gate opens (30 layers' products, 2 cores: 64 rows in one pass 98 ms, 32 rows
#: about 65; 8 rows 33 ms, 16 rows 40, :mod:`proxy.pair.few_rows`).
LAZY_MIN_TOKENS = 64


class PairScorer:
    """KV caches of the trunk for U and B; scores a tree of tokens after it.

    **U only where the scope gate opens.** With a scope gate (``gate``, the aligner's), U's
    rows are read only where the gate is open on B's row: where it is closed Δ is 0 and the
    aligner reads B's row for U's (:mod:`proxy.decoding.scope_gate`). So a pass may run B
    alone first, and U only when the gate opens on one of the rows the pass reads; where it
    opens on none, U's result is B's and U's KV cache falls behind the trunk (the tokens it
    has not run are :meth:`u_behind`), to run at the front of U's next pass. Out of scope
    the gate is closed almost everywhere (the demo offset: on 1,591 of 1,596 positions of B's
    greedy answers to 22 unrelated prompts), and the pair computes about half the rows. The answers
    are the same: every row the aligner reads where the gate is open is U's own.

    A tree runs B first where the gate was closed on every row of the last pass, or where
    U's cache is behind; where it was open U and B run as one pass (a one-token pass reads
    the weights once for both, a short draft nearly so, and in scope the gate stays open).
    An answer's first tree (the prompt, often with a whole draft) runs B first from
    :data:`LAZY_MIN_TOKENS` tokens on, else U and B together. ``pair.lazy_u`` off:
    U and B always run together (the reference that the tests and ``bench.speed`` compare
    against).
    """

    def __init__(self, pair: ScoredPair, gate: ScopeGate | None = None) -> None:
        from transformers import DynamicCache  # here: importing the pair does not load transformers

        self.pair = pair
        self.gate = gate
        self.caches = {Side.U: DynamicCache(), Side.B: DynamicCache()}
        self.trunk_len = 0
        self.trunk_ids: list[int] = []
        self.last: dict[Side, np.ndarray | None] = {Side.U: None, Side.B: None}
        self._undo: tuple[int, dict[Side, np.ndarray | None]] | None = None
        """Before the last :meth:`score`'s commit: trunk length and last rows."""
        self.opened_last: bool | None = None
        """Whether the scope gate was open on a row of the last pass (``None`` before the first)."""
        self.u_passes_skipped = 0
        """Passes whose U rows were B's (the gate closed on every row read)."""

    def u_behind(self) -> int:
        """Trunk tokens that U's KV cache does not hold yet (0 without lazy U)."""
        return self.trunk_len - self.caches[Side.U].get_seq_length() if self.pair.has_offset else 0

    def _lazy(self, n: int) -> bool:
        """Whether this pass of ``n`` tree tokens runs B first (class docstring)."""
        if self.u_behind():
            return True
        if self.gate is None or not self.pair.has_offset or not self.pair.lazy_u:
            return False
        return n >= LAZY_MIN_TOKENS if self.opened_last is None else not self.opened_last

    @torch.inference_mode()
    def score(
        self,
        tree: Tree,
        commit: int,
        need: Sequence[int] | None = None,
        reduce: Callable[[np.ndarray], Any] | None = None,
    ) -> tuple[Any, Any]:
        """See :meth:`proxy.decoding.alignment.TreeScorer.score`. ``reduce`` runs inside the pair's
        batched pass (:class:`TreeJob`), so the rows are freed when the pass ends. With lazy U
        (class docstring) U's result is B's where the gate is closed on every row the pass
        reads.

        Raises:
            ContextExhausted: the trunk plus the tree exceed the pair's context.
            ValueError: no trunk and nothing to score.
        """
        n = len(tree.tokens)
        if self.trunk_len + n > self.pair.max_length:
            raise ContextExhausted(f"the pair's context ({self.pair.max_length} tokens) is exhausted")
        want = list(range(n + 1)) if need is None else list(need)
        models = sides(self.pair.has_offset)
        rows: dict[Side, Any] = {}
        self._undo = None
        undo = (self.trunk_len, dict(self.last))
        fresh = self.trunk_len == 0
        if fresh and n and self.pair.prefix_cache is not None:
            tree, commit, want = self._from_prefix_cache(tree, commit, want)
            n = len(tree.tokens)
        if n == 0 and not self.u_behind():
            for m in models:
                rows[m] = self._from_last(m, len(want), reduce)
        elif not self._lazy(n):
            job = self._job(tree, commit, want, reduce, None)
            scored = self.pair.batcher.run(job)
            for m in models:
                rows[m], last, opened = scored[m]
                self._keep(m, n - commit, commit, last)
                if m is Side.B:
                    self.opened_last = opened
        else:
            # B first; U only where the gate opens on a row read, from where U's cache stops.
            behind = self.u_behind()
            if n:
                rows[Side.B], last, opened = self.pair.batcher.run(self._job(tree, commit, want, reduce, Side.B))[
                    Side.B
                ]
                self._keep(Side.B, n - commit, commit, last)
            else:  # nothing new for B (its row is the last committed one); U's cache is behind
                rows[Side.B] = self._from_last(Side.B, len(want), reduce)
                b_last = self.last[Side.B]
                opened = self.gate is not None and b_last is not None and bool(self.gate.open(b_last[None, :])[0])
            self.opened_last = opened
            if opened:
                u_tree = Tree(
                    tuple(self.trunk_ids[self.trunk_len - behind :]) + tuple(tree.tokens),
                    tuple(range(-1, behind - 1)) + tuple(p + behind if p >= 0 else behind - 1 for p in tree.parents),
                )
                job = self._job(u_tree, behind + commit, want, reduce, Side.U, behind)
                try:
                    rows[Side.U], last, _ = self.pair.batcher.run(job)[Side.U]
                except BaseException:
                    # U's pass left its cache as it was; B's leaves this tree too, as a failed
                    # pass of both would have left them.
                    if self.caches[Side.B].get_seq_length() > self.trunk_len:
                        self.caches[Side.B].crop(self.trunk_len - self.caches[Side.B].get_seq_length())
                    self.last[Side.B] = undo[1][Side.B]
                    raise
                self._keep(Side.U, n - commit, behind + commit, last)
            else:
                rows[Side.U] = rows[Side.B]  # Δ = 0 wherever the aligner reads: U's rows are not needed
                if commit:
                    self.last[Side.U] = self.last[Side.B]
                self.u_passes_skipped += 1
        if n:
            self._undo = undo
            self.trunk_len += commit
            self.trunk_ids.extend(tree.tokens[:commit])
            if fresh and self.pair.prefix_cache is not None:
                self.pair.prefix_cache.store(self.trunk_ids, self.caches, models)
        if not self.pair.has_offset:
            rows[Side.U] = rows[Side.B]
        return rows[Side.U], rows[Side.B]

    def _from_last(self, m: Side, count: int, reduce: Callable[[np.ndarray], Any] | None) -> Any:
        """Model ``m``'s rows of a tree with no new token: its last committed row ``count``
        times (or ``reduce``'s value of them).

        Raises:
            ValueError: nothing committed yet (no prompt).
        """
        last = self.last[m]
        if last is None:
            raise ValueError("empty prompt: the pair has nothing to condition on")
        repeated = np.repeat(last[None, :], count, axis=0)
        return reduce(repeated) if reduce else repeated

    def _keep(self, m: Side, remove: int, commit: int, last: np.ndarray | None) -> None:
        """After a pass of model ``m``: its cache keeps the committed chain (the rest of the
        tree, ``remove`` tokens, leaves it) and the last committed node's row."""
        if remove:
            self.caches[m].crop(-remove)
        if commit:
            self.last[m] = last

    def _job(
        self,
        tree: Tree,
        commit: int,
        want: Sequence[int],
        reduce: Callable[[np.ndarray], Any] | None,
        side: Side | None,
        behind: int = 0,
    ) -> TreeJob:
        """The pass of ``tree`` (its first ``commit`` nodes committed) after the cache of
        ``side`` (every model: ``None``), of which ``behind`` leading nodes are trunk tokens
        that this cache does not hold yet: the rows ``want`` count from after them. Each model's
        result is ``(reduce(rows) or the rows, a copy of the last committed node's row, whether
        the scope gate is open on a row the pass reads)``."""
        n = len(tree.tokens)
        held = self.caches[side or Side.B].get_seq_length()
        depth = np.zeros(n, dtype=np.int64)
        allowed = torch.zeros((n, held + n), dtype=torch.bool)
        allowed[:, :held] = True
        for i, p in enumerate(tree.parents):
            if p >= 0:
                depth[i] = depth[p] + 1
                allowed[i, held : held + p + 1] = allowed[p, held : held + p + 1]
            allowed[i, held + i] = True
        # Nodes whose next-token row is read: the requested ones and the last committed one.
        nodes = sorted({r - 1 + behind for r in want if r - 1 + behind >= 0} | ({commit - 1} if commit else set()))
        at = {node: j for j, node in enumerate(nodes)}
        # Rows stay float32 (the logits' precision): a float64 copy of a 128-position draft's
        # rows is 50 MB per model, and the aligner only gathers from them.
        identity = [at.get(r - 1 + behind, -1) for r in want] == list(range(len(want)))
        gate = self.gate

        def post(m: Side, after: np.ndarray) -> tuple[Any, np.ndarray | None, bool]:
            """In the pass: the rows ``want`` (or ``reduce``'s value of them), a copy of the
            last committed node's row, and whether the gate is open on a row read (B's rows)."""
            if identity:  # every row read is a kept row, in order (the usual draft): no copy
                out = after
            else:
                first = self.last[m]  # unchanged until the pass has returned
                out = np.empty((len(want), after.shape[1]), dtype=after.dtype)
                for j, r in enumerate(want):
                    if r - 1 + behind >= 0:
                        out[j] = after[at[r - 1 + behind]]
                    else:  # no trunk yet: row 0 is never read when the chain is the prompt
                        out[j] = first if first is not None else -np.inf
            opened = m is Side.B and gate is not None and bool(gate.open(after).any())
            return (reduce(out) if reduce else out), (after[at[commit - 1]].copy() if commit else None), opened

        return TreeJob(
            list(tree.tokens),
            allowed,
            torch.from_numpy(held + depth),
            nodes,
            self.caches,
            reduce=post,
            sides=None if side is None else (side,),
        )

    def _from_prefix_cache(self, tree: Tree, commit: int, want: list[int]) -> tuple[Tree, int, list[int]]:
        """A fresh scorer's first tree, less the head that the pair's prefix cache holds:
        the head enters the trunk and the caches, and the rest of the tree, its commit and
        its rows are renumbered after it. A head is usable up to the first node whose row
        is read, before the last committed node, and within the chain at the tree's start
        that every other node sees whole."""
        n = len(tree.tokens)
        chain = 0
        while chain < n and tree.parents[chain] == chain - 1:
            chain += 1
        limit = min(chain, n - 1, commit - 1, min(want, default=n + 1) - 1)
        for p in tree.parents[chain:]:
            limit = min(limit, p + 1)
        assert self.pair.prefix_cache is not None
        head, kv = self.pair.prefix_cache.lookup(tree.tokens, limit)
        if not head:
            return tree, commit, want
        from transformers import DynamicCache  # here: importing the pair does not load transformers

        for m, layers in kv.items():
            self.caches[m] = DynamicCache(ddp_cache_data=layers)
        self.trunk_len = head
        self.trunk_ids = list(tree.tokens[:head])
        rest = Tree(tree.tokens[head:], tuple(p - head if p >= head else -1 for p in tree.parents[head:]))
        return rest, commit - head, [r - head for r in want]

    def rollback(self, keep: int) -> int:
        """See :meth:`proxy.decoding.alignment.TreeScorer.rollback`. Rows after committed nodes are
        not kept (16 streams × 64 draft positions × 2 models × a 49,152-wide float64 row
        would be 800 MB): when part of the commit is rolled back, the last kept token
        leaves the caches too, to be run again at the front of the next tree, which gives
        its row for free.

        Raises:
            ValueError: nothing to roll back, or ``keep`` outside the last commit.
        """
        if self._undo is None:
            raise ValueError("rollback without a preceding score")
        before, last = self._undo
        committed = self.trunk_len - before
        if not 0 <= keep <= committed:
            raise ValueError(f"cannot keep {keep} of {committed} committed tokens")
        if keep == committed:
            return keep
        cached = max(0, keep - 1)
        for m in list(self.last):
            held = self.caches[m].get_seq_length()
            if held > before + cached:  # U's cache may stop earlier (lazy U, class docstring)
                self.caches[m].crop(before + cached - held)
            self.last[m] = last[m] if cached == 0 and keep == 0 else None
        self.trunk_len = before + cached
        del self.trunk_ids[self.trunk_len :]
        self._undo = None
        return cached
