"""Unlearning objectives, one short function each, as open-unlearning defines them
(``src/trainer/unlearn/*.py``; NPO: Zhang et al. 2024, arXiv 2404.05868;
SimNPO: Fan et al. 2024, arXiv 2410.07163; DPO: Rafailov et al. 2023).

Every objective sees the *combined* model (docs/concepts.md, "How an offset is trained") through
:class:`Scorer`: ``logits(batch)`` is l_U (proxy mode) or l_R + l_U − l_B
(exact mode), with gradients reaching U's adapter only; ``ref_logits(batch)``
is the same with the adapter disabled (l_B, or l_R), without gradients.

Shared helpers: :func:`nll` (summed NLL per sequence and label counts) and
:func:`log_ratio_loss` (DPO written once; NPO is DPO with only the losing side).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from proxy.training.data import IGNORE

Batch = dict[str, torch.Tensor]

NPO_BETA = 0.1  # open-unlearning's default, as in the NPO paper
SIMNPO_BETA, SIMNPO_DELTA, SIMNPO_GAMMA = 4.5, 0.0, 0.125  # open-unlearning's SimNPO defaults


class Scorer(Protocol):
    def logits(self, batch: Batch, at: torch.Tensor | None = None) -> torch.Tensor:
        """Combined logits with gradients to U's adapter: ``[B, L, V]``, or ``[N, V]`` at the
        positions of the ``[B, L]`` bool mask ``at`` (row-major: ``at.nonzero()``'s order)."""
        ...

    def ref_logits(self, batch: Batch, at: torch.Tensor | None = None) -> torch.Tensor:
        """Reference logits (adapter disabled), no gradients; shapes as :meth:`logits`."""
        ...

    def ref_nll(self, batch: Batch) -> torch.Tensor:
        """The reference's summed answer NLL per sequence, ``[B]`` (:func:`answer_nll` of
        :meth:`ref_logits`), no gradients; a scorer may cache it per sequence (the
        reference is frozen)."""
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


def answer_nll(
    score: Callable[..., torch.Tensor], batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nll` with the logits computed only where a label is predicted
    (:func:`answer_positions`): ``score(batch, at=mask)`` gives those rows ``[N, V]``
    (a :class:`Scorer`'s ``logits`` or ``ref_logits``). Summed NLL per sequence ``[B]`` and
    the label counts ``[B]``; the same numbers as :func:`nll` of the whole logits, without
    the output head, the softmax and their gradients at the prompt's positions."""
    labels = batch["labels"]
    at = answer_positions(labels)
    rows = score(batch, at=at).float()
    targets = labels.roll(-1, dims=1)[at]
    per_token = F.cross_entropy(rows, targets, reduction="none")
    total = torch.zeros(labels.shape[0], dtype=per_token.dtype).index_add(0, at.nonzero()[:, 0], per_token)
    return total, at.sum(-1)


def kl_rows(cur: torch.Tensor, ref: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ current) per row of logits ``[N, V]``, their ``weights``-weighted mean."""
    per_row = F.kl_div(
        F.log_softmax(cur.float(), dim=-1), F.log_softmax(ref.float(), dim=-1), reduction="none", log_target=True
    ).sum(-1)
    return (per_row * weights).sum() / weights.sum().clamp(min=1e-12)


def log_ratio_loss(s: Scorer, lose: Batch, beta: float, win: Batch | None = None) -> torch.Tensor:
    """DPO: −2/β · log σ(β · (log-ratio(win) − log-ratio(lose))), with
    log-ratio(x) = log π(x) − log π_ref(x) over whole answers. Without ``win``
    this is NPO."""

    def ratio(batch: Batch) -> torch.Tensor:
        cur, _ = answer_nll(s.logits, batch)
        return -(cur - s.ref_nll(batch))

    margin = -ratio(lose) if win is None else ratio(win) - ratio(lose)
    return -2.0 / beta * F.logsigmoid(beta * margin).mean()


def _retain_nll(s: Scorer, b: Batches) -> torch.Tensor:
    assert b.retain is not None
    total, count = answer_nll(s.logits, b.retain)
    return total.sum() / count.sum().clamp(min=1)


def answer_positions(labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L]`` mask of the positions whose next token is labelled (an answer token):
    where the logits predict the answer, the first answer token included. With ``weights``
    (``[B, L]``, per label: the batch's ``label_weights``), float weights instead: each
    such position weighs its next label's weight."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    if weights is None:
        return mask
    out = torch.zeros(labels.shape, dtype=torch.float32)
    out[:, :-1] = weights[:, 1:].float()
    return out * mask


def _retain_kl(s: Scorer, b: Batches, *, answer_only: bool = False) -> torch.Tensor:
    """KL to the reference on the retain batch, over its attended positions or, with
    ``answer_only``, over :func:`answer_positions` weighted by the labels' weights (an
    answer's fact words may weigh more, :func:`proxy.training.data.with_fact_weights`)."""
    assert b.retain is not None
    labels = b.retain["labels"]
    weights = answer_positions(labels, b.retain.get("label_weights")) if answer_only else b.retain["attention_mask"]
    at = weights > 0
    with torch.no_grad():
        ref = s.ref_logits(b.retain, at=at)
    return kl_rows(s.logits(b.retain, at=at), ref, weights[at].float())


def _retain_kl_answer(s: Scorer, b: Batches) -> torch.Tensor:
    return _retain_kl(s, b, answer_only=True)


def _grad_ascent(s: Scorer, b: Batches) -> torch.Tensor:
    total, count = answer_nll(s.logits, b.forget)
    return -total.sum() / count.sum().clamp(min=1)


def _npo(s: Scorer, b: Batches) -> torch.Tensor:
    return log_ratio_loss(s, b.forget, NPO_BETA)


def _simnpo(s: Scorer, b: Batches) -> torch.Tensor:
    total, count = answer_nll(s.logits, b.forget)
    length_normalised = total / count.clamp(min=1) - SIMNPO_DELTA
    return -F.logsigmoid(SIMNPO_BETA * length_normalised).mean() * 2.0 / SIMNPO_BETA


def _dpo(s: Scorer, b: Batches) -> torch.Tensor:
    if b.idk is None:
        raise ValueError("DPO needs the 'I don't know' answers")
    return log_ratio_loss(s, b.forget, NPO_BETA, win=b.idk)


@dataclass(frozen=True)
class Objective:
    """``forget_weight · forget_loss + retain_weight · retain_loss``, open-unlearning's
    ``gamma · forget_loss + alpha · retain_loss`` (GradDiff and its subclasses).

    ``retain`` is the retain term (NLL or KL to the reference), or ``None``;
    ``retain_required``: the objective is undefined without a retain set
    (SimNPO and DPO add the NLL term only when a retain set is given).
    """

    name: str
    forget: Callable[[Scorer, Batches], torch.Tensor]
    retain: Callable[[Scorer, Batches], torch.Tensor] | None = None
    retain_required: bool = False
    forget_weight: float = 1.0
    retain_weight: float = 1.0

    @property
    def retain_on_labels(self) -> bool:
        """The retain term reads only the labelled positions (NLL, or KL over the answer's
        positions): a retain item may then label some of its tokens only."""
        return self.retain is not None and self.retain is not _retain_kl

    @property
    def reads_ref_nll(self) -> bool:
        """The forget term compares with the reference's answer NLL (NPO, DPO: :meth:`Scorer.ref_nll`)."""
        return self.forget in (_npo, _dpo)

    @property
    def retain_is_kl(self) -> bool:
        """The retain term is a KL to the reference, the one that ``retain_positions`` applies to."""
        return self.retain in (_retain_kl, _retain_kl_answer)

    def __call__(self, s: Scorer, b: Batches) -> torch.Tensor:
        if self.retain_required and b.retain is None:
            raise ValueError(f"objective {self.name} needs a retain set (--retain)")
        loss = self.forget_weight * self.forget(s, b)
        if self.retain is not None and b.retain is not None:
            loss = loss + self.retain_weight * self.retain(s, b)
        return loss


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("GradAscent", _grad_ascent),
        Objective("GradDiff", _grad_ascent, _retain_nll, retain_required=True),
        Objective("KL", _grad_ascent, _retain_kl, retain_required=True),
        Objective("NPO", _npo),
        Objective("NPO+GD", _npo, _retain_nll, retain_required=True),
        Objective("NPO+KL", _npo, _retain_kl, retain_required=True),
        Objective("SimNPO", _simnpo, _retain_nll, forget_weight=SIMNPO_GAMMA),
        Objective("DPO", _dpo, _retain_nll),
    )
}


#: Where a KL retain term is averaged: every attended position (open-unlearning's
#: ``compute_kl_divergence``), or only where the answer is predicted.
RETAIN_POSITIONS = ("all", "answer")


def get_objective(
    name: str,
    *,
    forget_weight: float | None = None,
    retain_weight: float | None = None,
    retain_positions: str = "all",
) -> Objective:
    """The objective called ``name``, with open-unlearning's default weights
    unless ``forget_weight`` (gamma) or ``retain_weight`` (alpha) are given.

    ``retain_positions="answer"`` averages a KL retain term over the answer positions
    only (:func:`answer_positions`) instead of every attended token: with short retain
    answers after long prompts, the whole-sequence average gives the answer's first
    position about 1/80 of the term, too little to hold B's first-token distribution
    against NPO on forget answers that start with a name.

    Raises:
        ValueError: unknown name (the message lists the valid ones), a negative weight,
            or ``retain_positions`` other than ``"all"`` for an objective without a KL term.
    """
    if retain_positions not in RETAIN_POSITIONS:
        raise ValueError(f"retain_positions must be one of {RETAIN_POSITIONS}, not {retain_positions!r}")
    try:
        o = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}") from None
    for label, w in (("forget_weight", forget_weight), ("retain_weight", retain_weight)):
        if w is not None and not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"{label} must be a finite number ≥ 0, not {w}")
    retain = o.retain
    if retain_positions == "answer":
        if not o.retain_is_kl:
            raise ValueError(
                f"objective {name} has no KL retain term: retain positions 'answer' apply to KL and NPO+KL only"
            )
        retain = _retain_kl_answer
    return replace(
        o,
        retain=retain,
        forget_weight=o.forget_weight if forget_weight is None else forget_weight,
        retain_weight=o.retain_weight if retain_weight is None else retain_weight,
    )
