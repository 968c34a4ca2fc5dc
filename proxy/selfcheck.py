"""Greedy decoding through the local pair with B standing in for the remote, and
what training ends with: the scope threshold τ calibrated on held-out prompts
and a self-check of the offset (no remote needed).

At each step the remote's top-k candidates S_t are B's own top-k (k = 20, as a
hosted API gives), ℓ_t their B log-probabilities, and Δ_t(c) = log P_U(c) −
log P_B(c) for the same next tokens: the same-tokenizer fast path of serving.
The token chosen is the argmax of :func:`proxy.offset.target_logits` at T = 0
with the served α and τ, so an answer here is what ``serve`` gives at T = 0
with B as the remote. Rows are decoded in batches with a KV cache per model.

The margin of a prompt is the one of :mod:`proxy.threshold` (the largest −s_t
over the steps where α·Δ would change the greedy token, decoding with τ = ∞),
and τ is :func:`proxy.threshold.pick_threshold` over the calibration prompts'
margins. Fluency is B's mean per-token log-probability of an answer,
teacher-forced on its prompt (nats per token): the ℓ_B of each chosen token.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapters.templates import hf_chat_ids, hf_special_strings

from .data import Example
from .metrics import rouge_l_recall
from .offset import scope_score, target_logits

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
    """U and B for decoding: a peft model (B = adapter disabled), or two models (full fine-tuning)."""

    def __init__(self, u: Any, tokenizer: Any, eot_ids: Sequence[int], b: Any | None = None) -> None:
        self.u, self.b, self.tokenizer = u, b, tokenizer
        self.eot_ids = frozenset(eot_ids)
        self._specials = hf_special_strings(tokenizer)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt as serving tokenizes it (chat template, generation prompt, content as text)."""
        return hf_chat_ids(self.tokenizer, list(messages), self._specials)

    def _base(self) -> tuple[Any, contextlib.AbstractContextManager[Any]]:
        if self.b is not None:
            return self.b, contextlib.nullcontext()
        return self.u, self.u.disable_adapter()

    def forward(self, side: str, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> Any:
        model, ctx = self._base() if side == "B" else (self.u, contextlib.nullcontext())
        with ctx:
            return model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)


@torch.no_grad()
def greedy_decode(
    pair: PairModels,
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    alpha: float,
    threshold: float,
    max_tokens: int = 40,
    batch_size: int = 32,
) -> list[Decoded]:
    """Greedy answers to chat ``prompts`` with the offset at strength ``alpha`` and
    scope threshold ``threshold`` (nats; ``math.inf``: B's own answers, margins recorded).

    Raises:
        ValueError: ``max_tokens`` < 1 or a negative threshold.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if not threshold >= 0:
        raise ValueError("threshold must be >= 0")
    out: list[Decoded] = []
    for k in range(0, len(prompts), batch_size):
        out += _decode_batch(
            pair, [pair.prompt_ids(p) for p in prompts[k : k + batch_size]], alpha, threshold, max_tokens
        )
    return out


def _decode_batch(
    pair: PairModels, rows: list[list[int]], alpha: float, threshold: float, max_tokens: int
) -> list[Decoded]:
    from transformers import DynamicCache

    n, width = len(rows), max(len(r) for r in rows)
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else next(iter(pair.eot_ids))
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, so that every row's next token is the last column
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = {"U": DynamicCache(), "B": DynamicCache()}
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    margins = [0.0] * n
    done = [False] * n
    step_ids, step_pos = ids, pos
    tau = None if math.isinf(threshold) else threshold
    for _ in range(max_tokens):
        lb = torch.log_softmax(pair.forward("B", step_ids, mask, step_pos, caches["B"]).logits[:, -1].float(), -1)
        if alpha == 0:  # Δ plays no part: B alone (B's own answers)
            lu = lb
        else:
            lu = torch.log_softmax(pair.forward("U", step_ids, mask, step_pos, caches["U"]).logits[:, -1].float(), -1)
        ell, cand = lb.topk(TOP_K, dim=-1)  # [n, k]: B stands in for the remote's top-k
        delta = (lu.gather(-1, cand) - ell).numpy().astype(np.float64)  # Δ_t(c) = log P_U − log P_B
        ell_np = ell.numpy().astype(np.float64)
        nxt = torch.full((n, 1), pad, dtype=torch.long)
        for i in range(n):
            if done[i]:
                continue
            shifted = target_logits(ell_np[i], delta[i], temperature=0.0, alpha=alpha)
            if int(np.argmax(shifted)) != 0:  # α·Δ alone would change B's greedy token
                margins[i] = max(margins[i], -scope_score(ell_np[i], delta[i]))
            j = (
                0
                if tau is None
                else int(np.argmax(target_logits(ell_np[i], delta[i], temperature=0.0, alpha=alpha, threshold=tau)))
            )
            token = int(cand[i, j])
            logps[i].append(float(ell_np[i, j]))
            if token in pair.eot_ids:
                done[i] = True
                continue
            tokens[i].append(token)
            nxt[i, 0] = token
        if all(done):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = nxt
    return [
        Decoded(tuple(t), str(pair.tokenizer.decode(t, skip_special_tokens=True)).strip(), m, float(np.mean(lp)))
        for t, m, lp in zip(tokens, margins, logps, strict=True)
    ]


def calibrate_and_check(
    pair: PairModels,
    *,
    forget: Sequence[Example],
    calibration: Sequence[Example],
    check: Sequence[Example],
    neighbours: Sequence[Example] = (),
    alpha: float = 1.0,
    unchanged: float = 0.95,
    max_tokens: int = 40,
) -> dict[str, Any]:
    """τ from ``calibration``'s margins (the smallest that keeps ``unchanged`` of their
    greedy answers exactly B's), then the self-check at that τ: forget-set ROUGE-L recall
    with and without the offset, the fraction of held-out ``check`` and ``neighbours``
    answers unchanged, and B's per-token log-probability of the forget answers with the
    offset against B's own answers (fluency, nats per token). ``ok`` is false with a
    ``warnings`` entry for each check that failed (limits in :data:`SELF_CHECK_LIMITS`).

    Raises:
        ValueError: no calibration prompts, or a chat-less (raw text) example among them.
    """
    from .threshold import pick_threshold

    def prompts(items: Sequence[Example]) -> list[Sequence[dict[str, str]]]:
        if any(e.prompt is None for e in items):
            raise ValueError("the self-check needs chat prompts (question/answer or messages examples)")
        return [e.prompt for e in items if e.prompt is not None]

    chat_forget = [e for e in forget if e.prompt is not None]
    everything = [*calibration, *check, *neighbours, *chat_forget]
    base = greedy_decode(pair, prompts(everything), alpha=alpha, threshold=math.inf, max_tokens=max_tokens)
    nl, nc, nn = len(calibration), len(check), len(neighbours)
    cal = base[:nl]
    tau = pick_threshold([d.margin for d in cal], unchanged)
    # A greedy answer is kept exactly when τ exceeds its margin (proxy.threshold): the held-out
    # answers need no second decode; the forget answers are decoded again at τ.
    f_base = base[nl + nc + nn :]
    f_served = greedy_decode(pair, prompts(chat_forget), alpha=alpha, threshold=tau, max_tokens=max_tokens)

    def kept(lo: int, hi: int) -> float | None:
        return sum(d.margin < tau for d in base[lo:hi]) / (hi - lo) if hi > lo else None

    recall_base = [rouge_l_recall(e.target, d.text) for e, d in zip(chat_forget, f_base, strict=True)]
    recall_served = [rouge_l_recall(e.target, d.text) for e, d in zip(chat_forget, f_served, strict=True)]
    report: dict[str, Any] = {
        "offset_threshold": round(tau, 4),
        "unchanged_target": unchanged,
        "calibration_prompts": len(calibration),
        "calibration_unchanged": round(sum(d.margin < tau for d in cal) / len(cal), 4),
        "check_unchanged": _round(kept(nl, nl + nc)),
        "check_prompts": nc,
        "neighbour_unchanged": _round(kept(nl + nc, nl + nc + nn)),
        "neighbour_prompts": nn,
        "forget_prompts": len(chat_forget),
        "forget_rouge_l_recall_base": _round(_mean(recall_base)),
        "forget_rouge_l_recall_offset": _round(_mean(recall_served)),
        "forget_changed": _round(_mean([float(s.tokens != b.tokens) for s, b in zip(f_served, f_base, strict=True)])),
        "fluency_base": _round(_mean([d.logprob for d in f_base])),
        "fluency_offset": _round(_mean([d.logprob for d in f_served])),
        "max_tokens": max_tokens,
    }
    report["warnings"] = self_check_warnings(report)
    report["ok"] = not report["warnings"]
    return report


#: What the self-check asks of an offset (the README's "Train an offset" gives the reasons).
SELF_CHECK_LIMITS = {
    "forget_recall_ratio": 0.6,  # offset recall ≤ 0.6 × B's recall (when B knows the set: recall ≥ 0.2)
    "check_unchanged": 0.9,  # held-out general answers kept exactly
    "neighbour_unchanged": 0.8,  # held-out neighbour answers kept exactly
    "fluency_gap": 1.0,  # nats per token below B's own answers
}


def self_check_warnings(report: dict[str, Any]) -> list[str]:
    """One sentence per failed check of a :func:`calibrate_and_check` report."""
    lim, out = SELF_CHECK_LIMITS, []
    rb, ro = report.get("forget_rouge_l_recall_base"), report.get("forget_rouge_l_recall_offset")
    if rb is not None and ro is not None:
        if rb < 0.2:
            out.append(f"B barely knows the forget set (ROUGE-L recall {rb:.2f}): nothing to measure it forgets")
        elif ro > lim["forget_recall_ratio"] * rb:
            out.append(f"the forget set is still recalled: ROUGE-L recall {ro:.2f} with the offset, {rb:.2f} without")
    for key in ("check_unchanged", "neighbour_unchanged"):
        value = report.get(key)
        if value is not None and value < lim[key]:
            what = "held-out general" if key == "check_unchanged" else "held-out neighbour"
            out.append(
                f"the offset leaks out of scope: {value:.0%} of {what} answers unchanged (want ≥ {lim[key]:.0%})"
            )
    fb, fo = report.get("fluency_base"), report.get("fluency_offset")
    if fb is not None and fo is not None and fb - fo > lim["fluency_gap"]:
        out.append(f"in-scope answers read badly: {fo:.2f} nats/token under B against {fb:.2f} for B's own")
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
