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


class PairScorer:
    """KV caches of the trunk for U and B; scores a tree of tokens after it."""

    def __init__(self, pair: ScoredPair) -> None:
        from transformers import DynamicCache  # here: importing the pair does not load transformers

        self.pair = pair
        self.caches = {Side.U: DynamicCache(), Side.B: DynamicCache()}
        self.trunk_len = 0
        self.trunk_ids: list[int] = []
        self.last: dict[Side, np.ndarray | None] = {Side.U: None, Side.B: None}
        self._undo: tuple[int, dict[Side, np.ndarray | None]] | None = None
        """Before the last :meth:`score`'s commit: trunk length and last rows."""

    @torch.inference_mode()
    def score(
        self,
        tree: Tree,
        commit: int,
        need: Sequence[int] | None = None,
        reduce: Callable[[np.ndarray], Any] | None = None,
    ) -> tuple[Any, Any]:
        """See :meth:`proxy.decoding.alignment.TreeScorer.score`. ``reduce`` runs inside the pair's
        batched pass (:class:`TreeJob`), so the rows are freed when the pass ends.

        Raises:
            ContextExhausted: the trunk plus the tree exceed the pair's context.
            ValueError: no trunk and nothing to score.
        """
        n = len(tree.tokens)
        if self.trunk_len + n > self.pair.max_length:
            raise ContextExhausted(f"the pair's context ({self.pair.max_length} tokens) is exhausted")
        want = list(range(n + 1)) if need is None else list(need)
        models = sides(self.pair.has_offset)
        rows: dict[Side, np.ndarray] = {}
        self._undo = None
        undo = (self.trunk_len, dict(self.last))
        fresh = self.trunk_len == 0
        if fresh and n and self.pair.prefix_cache is not None:
            tree, commit, want = self._from_prefix_cache(tree, commit, want)
            n = len(tree.tokens)
        if n == 0:
            for m in models:
                if self.last[m] is None:
                    raise ValueError("empty prompt: the pair has nothing to condition on")
                repeated = np.repeat(self.last[m][None, :], len(want), axis=0)  # type: ignore[index]
                rows[m] = reduce(repeated) if reduce else repeated
        else:
            depth = np.zeros(n, dtype=np.int64)
            allowed = torch.zeros((n, self.trunk_len + n), dtype=torch.bool)
            allowed[:, : self.trunk_len] = True
            for i, p in enumerate(tree.parents):
                if p >= 0:
                    depth[i] = depth[p] + 1
                    allowed[i, self.trunk_len : self.trunk_len + p + 1] = allowed[
                        p, self.trunk_len : self.trunk_len + p + 1
                    ]
                allowed[i, self.trunk_len + i] = True
            # Nodes whose next-token row is read: the requested ones and the last committed one.
            nodes = sorted({r - 1 for r in want if r >= 1} | ({commit - 1} if commit else set()))
            at = {node: j for j, node in enumerate(nodes)}
            # Rows stay float32 (the logits' precision): a float64 copy of a 128-position draft's
            # rows is 50 MB per model, and the aligner only gathers from them.
            identity = [at.get(r - 1, -1) for r in want] == list(range(len(want)))

            def post(m: Side, after: np.ndarray) -> tuple[Any, np.ndarray | None]:
                """In the pass: the rows ``want`` (or ``reduce``'s value of them), and a copy
                of the last committed node's row."""
                if identity:  # every row read is a kept row, in order (the usual draft): no copy
                    out = after
                else:
                    first = self.last[m]  # unchanged until the pass has returned
                    out = np.empty((len(want), after.shape[1]), dtype=after.dtype)
                    for j, r in enumerate(want):
                        if r >= 1:
                            out[j] = after[at[r - 1]]
                        else:  # no trunk yet: row 0 is never read when the chain is the prompt
                            out[j] = first if first is not None else -np.inf
                return (reduce(out) if reduce else out), (after[at[commit - 1]].copy() if commit else None)

            job = TreeJob(
                list(tree.tokens), allowed, torch.from_numpy(self.trunk_len + depth), nodes, self.caches, reduce=post
            )
            scored = self.pair.batcher.run(job)
            for m in models:
                rows[m], last = scored[m]
                # Keep the committed chain in the cache, drop the rest of the tree.
                remove = n - commit
                if remove:
                    self.caches[m].crop(-remove)
                if commit:
                    self.last[m] = last
            self._undo = undo
            self.trunk_len += commit
            self.trunk_ids.extend(tree.tokens[:commit])
            if fresh and self.pair.prefix_cache is not None:
                self.pair.prefix_cache.store(self.trunk_ids, self.caches, models)
        if not self.pair.has_offset:
            rows[Side.U] = rows[Side.B]
        return rows[Side.U], rows[Side.B]

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
            if self.caches[m].get_seq_length():
                self.caches[m].crop(-(committed - cached))
            self.last[m] = last[m] if cached == 0 and keep == 0 else None
        self.trunk_len = before + cached
        del self.trunk_ids[self.trunk_len :]
        self._undo = None
        return cached
