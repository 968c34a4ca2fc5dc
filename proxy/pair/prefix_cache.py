"""Automatic prefix caching for the local pair: :class:`PrefixCache` keeps the KV caches of
recent prompts, by model, so that a prompt that begins like an earlier one runs only its
new tokens."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from proxy.pair.sides import Side


class PrefixCache:
    """The pair's KV caches of recent prompts, so that a prompt that begins like one
    before (a shared system prompt, a chat template's header) runs only its new tokens:
    automatic prefix caching, as vLLM's.

    Holds whole committed trunks of fresh :class:`proxy.pair.scorer.PairScorer` objects, at most
    ``max_tokens`` tokens in all (least recently used first out; about 92 KB per token
    for SmolLM2-135M's U and B, float32). A prefix is used from ``MIN_TOKENS`` shared
    tokens on. Thread-safe.
    """

    MIN_TOKENS = 8

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], dict[Side, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.tokens_reused = 0

    def _size(self) -> int:
        return sum(len(k) for k in self._entries)

    def lookup(self, ids: Sequence[int], limit: int) -> tuple[int, dict[Side, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """The longest cached prefix of ``ids``, at most ``limit`` tokens: its length and
        its keys and values by model (``[1, heads, length, dim]`` views, a model's at most
        that length: fewer where the entry holds fewer of its positions), or ``(0, {})``. Of
        entries that share as many tokens, the one whose models hold the most of them."""
        if limit < self.MIN_TOKENS:
            return 0, {}
        want = np.asarray(ids[:limit], dtype=np.int64)
        best, found, held = 0, None, 0
        with self._lock:
            for key in self._entries:
                n = min(len(key), len(want))
                if n < best:
                    continue
                diff = np.flatnonzero(np.asarray(key[:n], dtype=np.int64) != want[:n])
                common = int(diff[0]) if diff.size else n
                # Of two entries sharing as many tokens, the one whose models hold more of them
                # (an entry stored while U's cache was behind has fewer of U's, or none).
                covered = sum(min(common, layers[0][0].shape[2]) for layers in self._entries[key].values() if layers)
                if (common, covered) > (best, held):
                    best, found, held = common, key, covered
            if found is None or best < self.MIN_TOKENS:
                return 0, {}
            self._entries.move_to_end(found)
            kv = self._entries[found]
            self.hits += 1
            self.tokens_reused += best
        return best, {m: [(k[:, :, :best], v[:, :, :best]) for k, v in layers] for m, layers in kv.items()}

    def store(self, ids: Sequence[int], caches: dict[Side, Any], models: Sequence[Side]) -> None:
        """Keep the first ``len(ids)`` positions of ``caches`` (copies) under ``ids``, or the
        fewer that a model's cache holds (U's behind B's under lazy U,
        :class:`proxy.pair.scorer.PairScorer`; :meth:`lookup` gives them as they are); nothing
        when a cached entry already begins with them or they exceed the whole budget."""
        key = tuple(ids)
        if len(key) < self.MIN_TOKENS or len(key) > self.max_tokens:
            return
        with self._lock:
            if any(k[: len(key)] == key for k in self._entries):
                return
        kv = {
            m: [
                (layer.keys[:, :, : len(key)].clone(), layer.values[:, :, : len(key)].clone())
                for layer in caches[m].layers
            ]
            for m in models
            if caches[m].get_seq_length()  # U's cache may hold fewer tokens, or none (lazy U)
        }
        with self._lock:
            for k in [k for k in self._entries if key[: len(k)] == k]:  # shorter entries it extends
                del self._entries[k]
            self._entries[key] = kv
            while self._size() > self.max_tokens:
                self._entries.popitem(last=False)
