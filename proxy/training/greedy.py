"""Greedy decoding through the local pair with B standing in for the remote
(:func:`greedy_decode`, :func:`base_decode`) and B's log-probability of given answers
(:func:`answer_logprob`): what the self-check (:mod:`proxy.training.selfcheck`), the
scope sets and the benchmarks decode with (no remote needed).

At each step the remote's top-k candidates S_t are B's own top-k (k = 20, as a
hosted API gives), ℓ_t their B log-probabilities, and Δ_t(c) = log P_U(c) −
log P_B(c) for the same next tokens: the same-tokenizer fast path of serving.
The token chosen is the argmax of :func:`proxy.decoding.offset.target_logits` at T = 0
with the served α and τ, so an answer here is what ``serve`` gives at T = 0
with B as the remote. Rows are decoded in batches with a KV cache per model.

The margin of an answer is the one of :mod:`proxy.decoding.threshold` (the largest −s_t
over the steps where α·Δ would change the greedy token, decoding with τ = ∞).
Fluency is B's mean per-token log-probability of an answer, teacher-forced on its
prompt (nats per token): the ℓ_B of each chosen token.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapters.templates import hf_chat_ids, hf_special_strings
from proxy.common.literals import ScopeRule
from proxy.decoding.offset import flip_margin, target_logits
from proxy.decoding.scope_gate import ScopeGate
from proxy.decoding.vocab import text_ids
from proxy.pair.forward import adapter_layers, adapters_off
from proxy.pair.local import gated_rows
from proxy.training.prefix import head_is_plain, shared_hidden, shared_prefill, supports_sharing

#: Candidates per step: OpenAI's ``top_logprobs`` maximum, and the served default.
TOP_K = 20


@dataclass(frozen=True)
class Decoded:
    """One greedy answer: its token ids and text, its margin m (nats; 0 when no
    step would flip) and B's mean log-probability per answer token (nats)."""

    tokens: tuple[int, ...]
    text: str
    margin: float
    logprob: float


class PairModels:
    """U and B for decoding: a peft model (B = adapter disabled), or two models (full fine-tuning);
    with ``gate``, the offset is zero where the scope gate is closed (:mod:`proxy.decoding.scope_gate`)."""

    def __init__(
        self, u: Any, tokenizer: Any, eot_ids: Sequence[int], b: Any | None = None, gate: ScopeGate | None = None
    ) -> None:
        self.u, self.b, self.tokenizer, self.gate = u, b, tokenizer, gate
        self.eot_ids = frozenset(eot_ids)
        self.eot = eot_ids[0]  # the end-of-turn token a chat answer ends with
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot  # masked anyway
        self._specials = hf_special_strings(tokenizer)
        self._adapters = adapter_layers(u) if b is None else []
        self._plain: dict[int, bool] = {}  # per model: its output head is a plain linear map

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt as serving tokenizes it (chat template, generation prompt, content as text)."""
        return hf_chat_ids(self.tokenizer, list(messages), self._specials)

    def _side(self, side: str) -> tuple[Any, contextlib.AbstractContextManager[Any]]:
        """U or B (``side``) as a model to call, and the context that makes it that side."""
        if side == "U" or self.b is not None:
            return (self.u if side == "U" else self.b), contextlib.nullcontext()
        return self.u, adapters_off(self._adapters)

    def with_gate(self, gate: ScopeGate | None) -> PairModels:
        """The same models with scope gate ``gate`` (None: none)."""
        other = copy.copy(self)
        other.gate = gate
        return other

    @contextlib.contextmanager
    def base_model(self) -> Iterator[Any]:
        """B as a model to call (U with its adapter off, or the separate B)."""
        model, ctx = self._side("B")
        with ctx:
            yield model

    def forced(self, side: str, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The logits ``[n, len(keep), V]`` of U or B (``side``) over a right-padded batch
        (``ids``, ``mask``: ``[n, L]``) at the positions ``keep``; where the model's output
        head is plain (:func:`proxy.training.prefix.head_is_plain`), the rows' shared
        prefixes are computed once (:func:`proxy.training.prefix.shared_hidden`)."""
        model, ctx = self._side(side)
        with ctx:
            if id(model) not in self._plain:
                self._plain[id(model)] = head_is_plain(model, ids[:1, : int(mask[0].sum())])
            hidden = shared_hidden(model, ids, mask) if self._plain[id(model)] else None
            if hidden is None:
                return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            return model.get_output_embeddings()(hidden[:, keep])

    def prefill(self, side: str, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor] | None:
        """U's or B's prefill of the prompts ``rows`` with their shared prefixes computed once
        (:func:`proxy.training.prefix.shared_prefill`); None where they share too little or a
        model of the pair has a sliding window (both sides then decode from a plain prefill)."""
        if not (supports_sharing(self.u) and (self.b is None or supports_sharing(self.b))):
            return None
        model, ctx = self._side(side)
        with ctx:
            return shared_prefill(model, rows)

    def gated(self, lu: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        """U's log-probability rows (``[n, V]``) with B's where the scope gate is closed
        (Δ = 0 there); ``lu`` itself without a gate or where it is open everywhere."""
        return gated_rows(self.gate, lu, lb)

    def forward(
        self, side: str, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, keep: Any = None
    ) -> Any:
        """The output of U or B (``side``) over ``ids``; with ``keep`` (transformers'
        ``logits_to_keep``: a count of last positions or a 1-D tensor of positions) the
        logits only there."""
        model, ctx = self._side(side)
        extra = {} if keep is None else {"logits_to_keep": keep}
        with ctx:
            return model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=cache is not None, **extra
            )


@torch.no_grad()
def greedy_decode(
    pair: PairModels,
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    alpha: float,
    threshold: float | None,
    max_tokens: int = 40,
    batch_size: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    scope: ScopeRule = "step",
) -> list[Decoded]:
    """Greedy answers to chat ``prompts`` with the offset at strength ``alpha`` and
    scope threshold ``threshold`` under rule ``scope`` (nats; None: no threshold, Δ at every
    step as in the paper; ``math.inf``: B's own answers, margins recorded).
    ``temperature`` > 0 samples from q_t instead (the target distribution (docs/concepts.md) over the
    top-k, :func:`proxy.decoding.offset.target_logits`), reproducibly for a ``seed``.

    Raises:
        ValueError: ``max_tokens`` < 1, a negative threshold or temperature.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if threshold is not None and not threshold >= 0:
        raise ValueError("threshold must be >= 0")
    if not temperature >= 0:
        raise ValueError("temperature must be >= 0")
    rng = np.random.default_rng(seed)
    out: list[Decoded] = []
    for k in range(0, len(prompts), batch_size):
        out += _decode_batch(
            pair,
            [pair.prompt_ids(p) for p in prompts[k : k + batch_size]],
            alpha,
            threshold,
            max_tokens,
            temperature=temperature,
            rng=rng,
            scope=scope,
        )
    return out


def _decode_batch(
    pair: PairModels,
    rows: list[list[int]],
    alpha: float,
    threshold: float | None,
    max_tokens: int,
    *,
    temperature: float = 0.0,
    rng: np.random.Generator | None = None,
    scope: ScopeRule = "step",
) -> list[Decoded]:
    # transformers is imported here, not at the top: importing it takes seconds.
    from transformers import DynamicCache

    n, width = len(rows), max(len(r) for r in rows)
    pad = pair.pad
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, so that every row's next token is the last column
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches: dict[str, Any] = {"U": DynamicCache(), "B": DynamicCache()}
    sides = ("B",) if alpha == 0 else ("B", "U")
    first: dict[str, torch.Tensor] = {}  # the prefill's logits, where the prompts' shared prefixes were computed once
    for side in sides:
        done = pair.prefill(side, rows)  # both sides or neither, the same split: a function of the rows
        if done is not None:
            first[side], caches[side], mask, pos = done
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    margins = [0.0] * n
    live = list(range(n))  # the rows still decoding, in the order of the batch's rows
    step_ids, step_pos = ids, pos
    never = threshold is not None and math.isinf(threshold)  # τ = ∞: Δ is never applied

    def last_logits(side: str) -> torch.Tensor:
        if side in first:
            return first.pop(side).float()
        # logits at the last position only: the prompt's own are never read
        return pair.forward(side, step_ids, mask, step_pos, caches[side], keep=1).logits[:, -1].float()

    for _ in range(max_tokens):
        lb = torch.log_softmax(last_logits("B"), -1)
        if alpha == 0:  # Δ plays no part: B alone (B's own answers)
            lu = lb
        else:
            lu = pair.gated(torch.log_softmax(last_logits("U"), -1), lb)
        ell, cand = lb.topk(TOP_K, dim=-1)  # [m, k]: B stands in for the remote's top-k
        delta = (lu.gather(-1, cand) - ell).numpy().astype(np.float64)  # Δ_t(c) = log P_U − log P_B
        ell_np = ell.numpy().astype(np.float64)
        going: list[int] = []  # positions in ``live`` of the rows that go on
        nxt: list[int] = []
        for row, i in enumerate(live):
            j, flip = _step(ell_np[row], delta[row], alpha, threshold, scope)
            margins[i] = max(margins[i], flip)
            if temperature > 0:
                assert rng is not None
                q = target_logits(
                    ell_np[row],
                    delta[row],
                    temperature=temperature,
                    alpha=0.0 if never else alpha,
                    threshold=threshold,
                    scope=scope,
                )
                p = np.exp(q - np.max(q))
                j = int(rng.choice(len(p), p=p / p.sum()))
            token = int(cand[row, j])
            logps[i].append(float(ell_np[row, j]))
            if token in pair.eot_ids:
                continue
            tokens[i].append(token)
            going.append(row)
            nxt.append(token)
        if not going:
            break
        if len(going) < len(live):  # finished rows leave the batch and the caches
            index = torch.tensor(going)
            for cache in caches.values():
                if cache.get_seq_length():
                    cache.batch_select_indices(index)
            mask, step_pos = mask[index], step_pos[index]
            live = [live[row] for row in going]
        mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = torch.tensor(nxt)[:, None]
    return [
        Decoded(tuple(t), str(pair.tokenizer.decode(t, skip_special_tokens=True)).strip(), m, float(np.mean(lp)))
        for t, m, lp in zip(tokens, margins, logps, strict=True)
    ]


def _step(ell: np.ndarray, delta: np.ndarray, alpha: float, tau: float | None, scope: ScopeRule) -> tuple[int, float]:
    """One greedy step over the candidates (B's top-k, best first): the index chosen at
    scope threshold ``tau`` under rule ``scope`` (None: no threshold; ``math.inf``: B's own
    token) and the step's flip margin (:func:`proxy.decoding.offset.flip_margin`)."""
    flip = flip_margin(ell, delta, alpha, scope)
    if tau is not None and math.isinf(tau):
        return 0, flip
    scores = target_logits(ell, delta, temperature=0.0, alpha=alpha, threshold=tau, scope=scope)
    return int(np.argmax(scores)), flip


@torch.no_grad()
def base_decode(
    pair: PairModels,
    prompts: Sequence[Sequence[dict[str, str]]],
    answers: Sequence[str | None],
    *,
    alpha: float,
    max_tokens: int = 40,
    batch_size: int = 16,
    scope: ScopeRule = "step",
) -> list[Decoded]:
    """:func:`greedy_decode` at τ = ∞ (B's own greedy answers, with their margins under rule
    ``scope``) where
    ``answers`` guesses them (B's answers generated earlier, or None): each guessed answer
    is teacher-forced through U and B in one batched forward pass, which gives every step's
    candidates and Δ at once, and kept when B's greedy token is the guessed one at every
    step (the end-of-turn included). Rows without a guess, or whose guess B does not
    follow, are decoded step by step. Same answers and margins as :func:`greedy_decode`
    (up to float rounding between a padded batch and a KV cache), several times faster on a CPU.

    Raises:
        ValueError: ``prompts`` and ``answers`` differ in length, or ``max_tokens`` < 1.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    out: list[Decoded | None] = [None] * len(prompts)
    forced = [
        (i, pair.prompt_ids(p), text_ids(pair.tokenizer, a)[:max_tokens])
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
        if a is not None
    ]
    forced.sort(key=lambda r: len(r[1]) + len(r[2]))  # rows of similar length pad little
    for k in range(0, len(forced), batch_size):
        part = forced[k : k + batch_size]
        for (i, _, _), d in zip(part, _forced_batch(pair, part, alpha, max_tokens, scope), strict=True):
            out[i] = d
    rest = [i for i, d in enumerate(out) if d is None]
    if rest:
        decoded = greedy_decode(
            pair, [prompts[i] for i in rest], alpha=alpha, threshold=math.inf, max_tokens=max_tokens, scope=scope
        )
        for i, d in zip(rest, decoded, strict=True):
            out[i] = d
    return [d for d in out if d is not None]


def _forced_batch(
    pair: PairModels, rows: list[tuple[int, list[int], list[int]]], alpha: float, max_tokens: int, scope: ScopeRule
) -> list[Decoded | None]:
    n = len(rows)
    width = max(len(p) + len(a) for _, p, a in rows)
    pad = pair.pad
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, (_, p, a) in enumerate(rows):  # right padding: row r's step s is read at len(p) − 1 + s
        ids[r, : len(p) + len(a)] = torch.tensor(p + a)
        mask[r, : len(p) + len(a)] = 1
    # the output head runs only from the first row's first answer step on (rows of a batch have
    # prompts of similar length: the prompts' other positions are never read)
    first = min(len(p) for _, p, _ in rows) - 1
    keep = torch.arange(first, width)
    lb = torch.log_softmax(pair.forced("B", ids, mask, keep).float(), -1)
    lu = lb if alpha == 0 else torch.log_softmax(pair.forced("U", ids, mask, keep).float(), -1)
    out: list[Decoded | None] = []
    for r, (_, p, a) in enumerate(rows):
        steps = len(a) + (len(a) < max_tokens)  # the end-of-turn step, unless the answer was cut
        at = slice(len(p) - 1 - first, len(p) - 1 - first + steps)
        ell, cand = lb[r, at].topk(TOP_K, dim=-1)
        delta = (pair.gated(lu[r, at], lb[r, at]).gather(-1, cand) - ell).numpy().astype(np.float64)
        ell_np, cand_np = ell.numpy().astype(np.float64), cand.numpy()
        margin, logps = 0.0, []
        ok = not any(t in pair.eot_ids for t in a)  # a guess that ends the turn early is not B's answer
        for s in range(steps if ok else 0):
            want = a[s] if s < len(a) else None
            top = int(cand_np[s, 0])
            if (want is None and top not in pair.eot_ids) or (want is not None and top != want):
                ok = False  # B's greedy answer leaves the guess here: decode this row instead
                break
            _, flip = _step(ell_np[s], delta[s], alpha, math.inf, scope)
            margin = max(margin, flip)
            logps.append(float(ell_np[s, 0]))
        out.append(
            Decoded(
                tuple(a), str(pair.tokenizer.decode(a, skip_special_tokens=True)).strip(), margin, float(np.mean(logps))
            )
            if ok
            else None
        )
    return out


@torch.no_grad()
def answer_logprob(
    pair: PairModels, prompts: Sequence[Sequence[dict[str, str]]], answers: Sequence[str]
) -> list[float]:
    """B's mean log-probability per token of each answer (its end-of-turn included),
    teacher-forced on its chat prompt (nats per token): the fluency measure of the
    self-check and the benchmarks, for answers from anywhere (served, or another model's).

    Raises:
        ValueError: ``prompts`` and ``answers`` differ in length.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    eot = pair.eot
    out = []
    for p, a in zip(prompts, answers, strict=True):
        head = pair.prompt_ids(p)
        tail = [*text_ids(pair.tokenizer, a), eot]
        ids = torch.tensor([head + tail])
        mask = torch.ones_like(ids)
        lb = torch.log_softmax(pair.forward("B", ids, mask, torch.arange(ids.shape[1])[None], None).logits.float(), -1)
        at = torch.arange(len(head) - 1, ids.shape[1] - 1)
        out.append(float(lb[0, at, ids[0, len(head) :]].mean()))
    return out
