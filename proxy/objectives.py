"""Unlearning objectives, one short function each, as open-unlearning defines them
(``src/trainer/unlearn/*.py``; NPO: Zhang et al. 2024, arXiv 2404.05868;
SimNPO: Fan et al. 2024, arXiv 2410.07163; DPO: Rafailov et al. 2023).

Every objective sees the *combined* model of DESIGN.md through
:class:`Scorer`: ``logits(batch)`` is l_U (proxy mode) or l_R + l_U − l_B
(exact mode), with gradients reaching U's adapter only; ``ref_logits(batch)``
is the same with the adapter disabled (l_B, or l_R), without gradients.

Shared helpers: :func:`nll` (summed NLL per sequence and label counts) and
:func:`log_ratio_loss` (DPO written once; NPO is DPO with only the losing side).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .data import IGNORE

Batch = dict[str, torch.Tensor]

NPO_BETA = 0.1  # open-unlearning's default, as in the NPO paper
SIMNPO_BETA, SIMNPO_DELTA, SIMNPO_GAMMA = 4.5, 0.0, 0.125  # open-unlearning's SimNPO defaults


class Scorer(Protocol):
    def logits(self, batch: Batch) -> torch.Tensor:
        """Combined logits ``[B, L, V]`` with gradients to U's adapter."""
        ...

    def ref_logits(self, batch: Batch) -> torch.Tensor:
        """Reference logits ``[B, L, V]`` (adapter disabled), no gradients."""
        ...


@dataclass
class Batches:
    forget: Batch
    retain: Batch | None = None
    idk: Batch | None = None
    """The forget questions with "I don't know" answers (DPO's preferred side)."""


def nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL per sequence ``[B]`` and the number of labelled tokens ``[B]``."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(shift_labels.shape)
    count = (shift_labels != IGNORE).sum(-1)
    return per_token.sum(-1), count


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL over the batch (what ``outputs.loss`` is in transformers)."""
    total, count = nll(logits, labels)
    return total.sum() / count.sum().clamp(min=1)


def kl_to_reference(logits: torch.Tensor, ref: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ current), averaged over the attended positions (open-unlearning's
    ``compute_kl_divergence``, restricted to real tokens)."""
    cur = F.log_softmax(logits.float(), dim=-1)
    tgt = F.log_softmax(ref.float(), dim=-1)
    per_pos = F.kl_div(cur, tgt, reduction="none", log_target=True).sum(-1)  # [B, L]
    mask = attention_mask.to(per_pos.dtype)
    return (per_pos * mask).sum() / mask.sum().clamp(min=1)


def log_ratio_loss(s: Scorer, lose: Batch, beta: float, win: Batch | None = None) -> torch.Tensor:
    """DPO: −2/β · log σ(β · (log-ratio(win) − log-ratio(lose))), with
    log-ratio(x) = log π(x) − log π_ref(x) over whole answers. Without ``win``
    this is NPO."""

    def ratio(batch: Batch) -> torch.Tensor:
        cur, _ = nll(s.logits(batch), batch["labels"])
        with torch.no_grad():
            ref, _ = nll(s.ref_logits(batch), batch["labels"])
        return -(cur - ref)

    margin = -ratio(lose) if win is None else ratio(win) - ratio(lose)
    return -2.0 / beta * F.logsigmoid(beta * margin).mean()


def _retain_nll(s: Scorer, b: Batches) -> torch.Tensor:
    if b.retain is None:
        raise ValueError("this objective needs a retain set (--retain)")
    return mean_nll(s.logits(b.retain), b.retain["labels"])


def _retain_kl(s: Scorer, b: Batches) -> torch.Tensor:
    if b.retain is None:
        raise ValueError("this objective needs a retain set (--retain)")
    with torch.no_grad():
        ref = s.ref_logits(b.retain)
    return kl_to_reference(s.logits(b.retain), ref, b.retain["attention_mask"])


def grad_ascent(s: Scorer, b: Batches) -> torch.Tensor:
    return -mean_nll(s.logits(b.forget), b.forget["labels"])


def grad_diff(s: Scorer, b: Batches) -> torch.Tensor:
    return grad_ascent(s, b) + _retain_nll(s, b)


def grad_kl(s: Scorer, b: Batches) -> torch.Tensor:
    return grad_ascent(s, b) + _retain_kl(s, b)


def npo(s: Scorer, b: Batches) -> torch.Tensor:
    return log_ratio_loss(s, b.forget, NPO_BETA)


def npo_gd(s: Scorer, b: Batches) -> torch.Tensor:
    return npo(s, b) + _retain_nll(s, b)


def npo_kl(s: Scorer, b: Batches) -> torch.Tensor:
    return npo(s, b) + _retain_kl(s, b)


def simnpo(s: Scorer, b: Batches) -> torch.Tensor:
    total, count = nll(s.logits(b.forget), b.forget["labels"])
    length_normalised = total / count.clamp(min=1) - SIMNPO_DELTA
    forget = -F.logsigmoid(SIMNPO_BETA * length_normalised).mean() * 2.0 / SIMNPO_BETA
    return SIMNPO_GAMMA * forget + (_retain_nll(s, b) if b.retain is not None else 0.0)


def dpo(s: Scorer, b: Batches) -> torch.Tensor:
    if b.idk is None:
        raise ValueError("DPO needs the 'I don't know' answers")
    loss = log_ratio_loss(s, b.forget, NPO_BETA, win=b.idk)
    return loss + (_retain_nll(s, b) if b.retain is not None else 0.0)


OBJECTIVES: dict[str, Callable[[Scorer, Batches], torch.Tensor]] = {
    "GradAscent": grad_ascent,
    "GradDiff": grad_diff,
    "KL": grad_kl,
    "NPO": npo,
    "NPO+GD": npo_gd,
    "NPO+KL": npo_kl,
    "SimNPO": simnpo,
    "DPO": dpo,
}
NEEDS_RETAIN = frozenset({"GradDiff", "KL", "NPO+GD", "NPO+KL"})


def get_objective(name: str) -> Callable[[Scorer, Batches], torch.Tensor]:
    """The objective called ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}") from None
