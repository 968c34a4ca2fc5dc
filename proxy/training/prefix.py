"""Shared prefixes in a training batch (:func:`shared_hidden`): a model's last hidden
states over a right-padded batch, with the tokens that rows share at their start
computed once.

A training step's rows share most of their prompts: every chat row starts with the same
system prompt and header (24 tokens of SmolLM2's template), and a forget example's own
answers and cross answers (:mod:`proxy.training.plan`) repeat its whole question. The
batch is run in up to three passes over one KV cache:

1. the prefix that every row shares (``[1, A]``);
2. per group of rows that share more, that group's further prefix (``[G, P]``,
   right-padded, attending to pass 1);
3. each row's remaining tokens (``[N, S]``, right-padded, attending to its group's
   cache, the group's padding masked).

Each token is at its own position (explicit ``position_ids``) and attends to the same
tokens as in one pass over the row, so the hidden states are the same function of the
weights, and gradients reach every shared token's computation once per row that reads it
(``tests/test_train.py`` checks hidden states and LoRA gradients against the plain pass).
On the demo's steps this computes about half the tokens of the padded batch.

Only for models whose every layer attends to the whole context (no sliding window): the
cache is transformers' ``DynamicCache`` of full-attention layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: A group shares its further prefix only when that saves at least this many tokens' passes.
MIN_SAVING = 8


#: A pass of its own costs about as much as this many token positions (its launch over every
#: layer; 2 CPU cores, SmolLM2-135M): rows' own tokens split into length buckets only where
#: the padding saved is larger.
PASS_COST = 32

#: At most this many passes over the rows' own tokens.
MAX_BUCKETS = 3


def length_buckets(lengths: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Row indices split into at most :data:`MAX_BUCKETS` groups of similar ``lengths``
    (contiguous in length order; each in index order), each run as one right-padded pass: the split that
    minimises the positions computed, ``Σ rows · longest``, plus :data:`PASS_COST` per pass."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    # best[k][j]: the cost of the first j rows (in length order) in k passes, and where the last pass starts
    best = [[(math.inf, 0)] * (n + 1) for _ in range(MAX_BUCKETS + 1)]
    best[0][0] = (0.0, 0)
    for k in range(1, MAX_BUCKETS + 1):
        for j in range(1, n + 1):
            best[k][j] = min(
                ((best[k - 1][i][0] + (j - i) * sizes[j - 1] + PASS_COST, i) for i in range(j)), key=lambda c: c[0]
            )
    k = min(range(1, MAX_BUCKETS + 1), key=lambda k: best[k][n][0])
    out, j = [], n
    while k:
        i = best[k][j][1]
        out.append(tuple(sorted(order[i:j])))
        j, k = i, k - 1
    return tuple(reversed(out))


@dataclass(frozen=True)
class PrefixPlan:
    """How a batch of ``N`` rows splits: the common prefix length ``common`` (A), the
    groups (row indices, further prefix length each; a group of one has length 0), per
    row its group's index, and the buckets of rows whose own tokens run in one pass each
    (:func:`length_buckets`)."""

    lengths: tuple[int, ...]
    common: int
    groups: tuple[tuple[tuple[int, ...], int], ...]
    group_of: tuple[int, ...]

    @property
    def starts(self) -> list[int]:
        """Per row, where its own tokens start (after the common and its group's prefix)."""
        return [self.common + self.groups[g][1] for g in self.group_of]

    @property
    def buckets(self) -> tuple[tuple[int, ...], ...]:
        return length_buckets([n - s for n, s in zip(self.lengths, self.starts, strict=True)])

    @property
    def computed(self) -> int:
        """Token positions the passes compute, padding included (the cost)."""
        width = max((length for _, length in self.groups), default=0)
        own = [n - s for n, s in zip(self.lengths, self.starts, strict=True)]
        suffix = sum(len(b) * max(own[i] for i in b) for b in self.buckets)
        return self.common + (len(self.groups) * width if width else 0) + suffix


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def plan_prefixes(rows: Sequence[Sequence[int]]) -> PrefixPlan | None:
    """The split of token rows ``rows`` (unpadded) into a common prefix and groups; None when
    sharing would compute no fewer positions than one right-padded pass.

    Every row keeps at least one token of its own. Rows are taken in lexicographic order
    after the common prefix; a row joins the group before it when the group, its shared
    length cut to what the row shares with it (``l``), saves at least as many token passes
    as before and at least :data:`MIN_SAVING` (``k · l ≥ (k − 1) · L`` for a group of ``k``
    rows sharing ``L``). The rows that share nothing further form one group of length 0.
    """
    if len(rows) < 2:
        return None
    lengths = tuple(len(r) for r in rows)
    common = min(n - 1 for n in lengths)
    for r in rows[1:]:
        common = min(common, _lcp(rows[0], r))
    tails = [list(r[common:]) for r in rows]
    found: list[tuple[list[int], int]] = []  # (members, shared length; a lone row: all but its last token)
    for i in sorted(range(len(rows)), key=lambda i: tails[i]):
        if found:
            members, length = found[-1]
            k = len(members)
            shared = min(_lcp(tails[members[0]], tails[i]), len(tails[i]) - 1, length)
            if shared > 0 and k * shared >= max(MIN_SAVING, (k - 1) * length):
                found[-1] = ([*members, i], shared)
                continue
        found.append(([i], len(tails[i]) - 1))
    groups = [(tuple(m), length) for m, length in found if len(m) > 1]
    alone = tuple(i for m, _ in found if len(m) == 1 for i in m)
    if alone:
        groups.append((alone, 0))
    group_of = [0] * len(rows)
    for g, (grouped, _) in enumerate(groups):
        for i in grouped:
            group_of[i] = g
    plan = PrefixPlan(lengths, common, tuple(groups), tuple(group_of))
    if plan.computed >= len(rows) * max(lengths):
        return None
    return plan


def supports_sharing(model: Any) -> bool:
    """Whether ``model`` attends to the whole context in every layer (no sliding window),
    so that a prefix's cache stands for the prefix."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    return getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)


def head_is_plain(model: Any, row: torch.Tensor) -> bool:
    """Whether ``model``'s logits are its output head applied to its last hidden state (no
    soft cap, scale or bias after it), checked on one unpadded row of token ids (``[1, L]``):
    then the head may run on the hidden states of :func:`shared_hidden` where logits are needed."""
    with torch.no_grad():
        out = model(input_ids=row, output_hidden_states=True, logits_to_keep=1)
        last = model.get_output_embeddings()(out.hidden_states[-1][:, -1])
    return bool(torch.allclose(last, out.logits[:, -1], atol=1e-4, rtol=1e-4))


def _right_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(list(r))
            mask[i, : len(r)] = 1
    return ids, mask


def _last_hidden(model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,  # the output head runs on one position: the caller applies it where needed
    )
    return out.hidden_states[-1]


@dataclass
class _Prefixes:
    """The passes over a plan's prefixes: the cache (one row per batch row, after them), the
    attention mask over it (``[N, A + P]``), and the hidden states of the common prefix
    (``[A, d]``) and of the groups' prefixes (``[G, P, d]``), where there are any."""

    cache: Any
    mask: torch.Tensor
    common: torch.Tensor | None
    groups: torch.Tensor | None
    starts: list[int]


def _prefixes(model: Any, rows: Sequence[Sequence[int]], plan: PrefixPlan) -> _Prefixes:
    """Passes 1 and 2 of :func:`shared_hidden` and :func:`shared_prefill`."""
    from transformers import DynamicCache  # transformers is imported here: it takes seconds

    n, common = len(rows), plan.common
    cache = DynamicCache()
    hidden_common = hidden_groups = None
    if common:
        ids = torch.tensor([list(rows[0][:common])])
        hidden_common = _last_hidden(model, ids, torch.ones_like(ids), torch.arange(common)[None, :], cache)[0]
    width = max(length for _, length in plan.groups)
    group_mask = torch.zeros((n, 0), dtype=torch.long)
    if width:
        prefixes = [rows[members[0]][common : common + length] for members, length in plan.groups]
        ids, mask = _right_padded(prefixes, 0)
        if common:
            cache.batch_repeat_interleave(len(plan.groups))
        pos = (common + torch.arange(width))[None, :].expand(len(plan.groups), -1)
        ones = torch.ones((len(plan.groups), common), dtype=torch.long)
        hidden_groups = _last_hidden(model, ids, torch.cat([ones, mask], dim=1), pos, cache)
        cache.batch_select_indices(torch.tensor(plan.group_of))
        group_mask = mask[list(plan.group_of)]
    elif common:
        cache.batch_repeat_interleave(n)
    mask = torch.cat([torch.ones((n, common), dtype=torch.long), group_mask], dim=1)
    return _Prefixes(cache, mask, hidden_common, hidden_groups, plan.starts)


def _select(cache: Any, index: torch.Tensor) -> Any:
    """A new cache holding rows ``index`` of ``cache`` (a ``DynamicCache`` of full-attention
    layers), differentiable: several passes may continue from one set of prefixes."""
    from transformers import DynamicCache

    out = DynamicCache()
    for k, layer in enumerate(cache.layers):
        out.update(layer.keys[index], layer.values[index], k)
    return out


def _rows_of(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]] | None:
    """The unpadded rows of a right-padded batch; None for another padding."""
    lengths = attention_mask.sum(-1)
    width = input_ids.shape[1]
    if not bool((attention_mask == (torch.arange(width)[None, :] < lengths[:, None])).all()):
        return None
    return [input_ids[i, : int(n)].tolist() for i, n in enumerate(lengths)]


def shared_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """``model``'s last hidden state ``[B, L, d]`` over the right-padded batch
    (``input_ids``, ``attention_mask``: ``[B, L]``), the shared prefixes computed once
    (:func:`plan_prefixes`); zeros at padding. None where sharing does not apply (a
    left-padded or gapped mask, a sliding-window model, nothing shared): the caller runs
    the plain pass. Gradients flow as in the plain pass (the model's mode decides)."""
    rows = _rows_of(input_ids, attention_mask)
    plan = plan_prefixes(rows) if rows is not None and supports_sharing(model) else None
    if rows is None or plan is None:
        return None
    done = _prefixes(model, rows, plan)
    buckets = plan.buckets
    own: dict[int, torch.Tensor] = {}  # per row, the hidden states of its own tokens
    for bucket in buckets:
        index = torch.tensor(bucket)
        cache = done.cache if len(buckets) == 1 else _select(done.cache, index)
        ids, suffix_mask = _right_padded([rows[i][done.starts[i] :] for i in bucket], 0)
        pos = index.new_tensor([done.starts[i] for i in bucket])[:, None] + torch.arange(ids.shape[1])[None, :]
        part = _last_hidden(model, ids, torch.cat([done.mask[index], suffix_mask], dim=1), pos, cache)
        for r, i in enumerate(bucket):
            own[i] = part[r, : len(rows[i]) - done.starts[i]]
    width = input_ids.shape[1]
    hidden = []
    for i in range(len(rows)):
        pieces = [] if done.common is None else [done.common]
        g, length = plan.group_of[i], plan.groups[plan.group_of[i]][1]
        if done.groups is not None and length:
            pieces.append(done.groups[g, :length])
        pieces.append(own[i])
        h = torch.cat(pieces)
        hidden.append(torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[0])))
    return torch.stack(hidden)


def shared_prefill(
    model: Any, rows: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor] | None:
    """The prefill of decoding ``rows`` (prompts' token ids, unpadded), the shared prefixes
    computed once: (the logits after each row's last token ``[N, V]``, the KV cache, the
    attention mask over it ``[N, W]``, each row's last position ``[N, 1]``). Each row's own
    tokens are left-padded after its prefixes, so that its last token is the cache's last
    column; a decoding step appends one column to the cache and the mask, at the next
    position. None where sharing does not apply (see :func:`shared_hidden`)."""
    plan = plan_prefixes(rows) if supports_sharing(model) else None
    if plan is None:
        return None
    done = _prefixes(model, rows, plan)
    tails = [list(r[s:]) for r, s in zip(rows, done.starts, strict=True)]
    width = max(len(t) for t in tails)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    suffix_mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (t, start) in enumerate(zip(tails, done.starts, strict=True)):
        ids[i, width - len(t) :] = torch.tensor(t)
        suffix_mask[i, width - len(t) :] = 1
        pos[i, width - len(t) :] = start + torch.arange(len(t))
    mask = torch.cat([done.mask, suffix_mask], dim=1)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=done.cache, use_cache=True, logits_to_keep=1
    )
    return out.logits[:, -1], done.cache, mask, pos[:, -1:]
