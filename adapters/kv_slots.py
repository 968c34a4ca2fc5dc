"""The KV caches an in-process transformers remote keeps between calls (:class:`SlotPool`):
one per recently seen token sequence, so that a token-by-token decode costs one new token
per step, also with several requests interleaved or batched."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Caches kept at least; the pool grows with the batches (:meth:`SlotPool.claim`). A
#: SmolLM2-135M cache of 100 tokens is about 5 MB.
N_CACHES = 8


@dataclass
class CacheSlot:
    """A transformers ``DynamicCache`` and the token ids it holds; ``used``: when last used."""

    cache: Any = None
    tokens: list[int] = field(default_factory=list)
    used: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of ``a`` and ``b`` (list slices compared in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class SlotPool:
    """At least :data:`N_CACHES` cache slots. Not thread-safe: its owner holds a lock."""

    def __init__(self) -> None:
        self.slots = [CacheSlot() for _ in range(N_CACHES)]
        self._clock = itertools.count(1)

    def claim(self, tokens: Sequence[int], need: int, taken: Collection[int] = ()) -> tuple[CacheSlot, int]:
        """The slot (not one of the ``taken`` indices) for ``tokens``, holding the longest
        prefix of them that any slot holds (at most ``need`` tokens), and that prefix's
        length; the caller extends it by the rest and calls :meth:`used`. A slot holding
        exactly such a prefix is extended in place; a slot holding more past it (another
        request's answer, or a rejected draft) is kept, and its prefix copied into the least
        recently used slot, so that requests sharing a prompt (a forget item's sampled
        answers) do not crop each other's caches. The pool grows to twice the largest batch."""
        from transformers import DynamicCache  # here: importing transformers takes seconds

        want = list(tokens)
        if len(self.slots) < 2 * (len(taken) + 1):
            self.slots.append(CacheSlot())
        free = [i for i in range(len(self.slots)) if i not in taken]
        shared = {i: min(common_prefix(self.slots[i].tokens, want), need) for i in free}
        index = max(free, key=lambda i: (shared[i], self.slots[i].used))
        best, common = self.slots[index], shared[index]
        if common == len(best.tokens) and common:
            return best, common
        spare = min((i for i in free if i != index), key=lambda i: self.slots[i].used, default=index)
        target = self.slots[spare]
        if common == 0:
            target.cache, target.tokens = DynamicCache(), []
        elif spare == index:  # no other slot: crop this one
            best.cache.crop(common - len(best.tokens))  # a negative count: tokens to drop
            best.tokens = best.tokens[:common]
        else:
            copy = DynamicCache()
            for li, layer in enumerate(best.cache.layers):
                copy.update(layer.keys[:, :, :common].clone(), layer.values[:, :, :common].clone(), li)
            target.cache, target.tokens = copy, best.tokens[:common]
        return target, common

    def used(self, slot: CacheSlot, tokens: Sequence[int]) -> None:
        """``slot`` now holds ``tokens``, used last."""
        slot.tokens = list(tokens)
        slot.used = next(self._clock)

    def clear(self) -> None:
        self.slots = [CacheSlot() for _ in range(N_CACHES)]
