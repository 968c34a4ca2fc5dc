"""Fitting the scope gate (:mod:`proxy.decoding.scope_gate`) at the end of training.

Positions: every position of an answer that predicts one of its tokens (the prompt's
last position and the answer's own, the end-of-turn's excluded), teacher-forced
through B. In scope: the forget set's answers and B's own answers to its questions
(what the offset was trained to lower, in the user's words and in B's). Out of scope:
the user's retain set, the broad retain set's training part and the trained neighbours
(the forget set's questions about nearby entities, which the offset damages first).
The self-check's held-out parts (calibration, check, held-out neighbours) stay out,
so that it measures the gate on prompts it has not seen.

The classifier is an L2-regularised logistic regression (class-balanced: the two
classes weigh the same whatever their counts) on the standardised features
φ_t = Q·W⁺·log p_B (the module docstring of :mod:`proxy.decoding.scope_gate`), fitted
by L-BFGS (torch); the probe is then written in the coordinates of the log-probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from proxy.decoding.scope_gate import ScopeGate
from proxy.training.data import IGNORE, Example, encode

logger = logging.getLogger(__name__)


def feature_map(head_weight: torch.Tensor) -> torch.Tensor:
    """Q·W⁺ for output head ``head_weight`` (W, ``[V, d]``): ``[d, V]`` float32, the map
    from a row of log-probabilities to the features φ (module docstring of
    :mod:`proxy.decoding.scope_gate`)."""
    w = head_weight.detach().to(torch.float64)
    pinv = torch.linalg.pinv(w)  # [d, V]
    one = pinv @ torch.ones(w.shape[0], dtype=torch.float64)
    norm = one.norm()
    if norm > 0:
        one = one / norm
        pinv = pinv - one[:, None] * (one[None, :] @ pinv)
    return pinv.to(torch.float32)


@torch.no_grad()
def answer_rows_features(
    model_b: Any, tokenizer: Any, eot_id: int, examples: Sequence[Example], fmap: torch.Tensor, max_length: int
) -> list[torch.Tensor]:
    """φ at the answer positions of each example (``[n_i, d]`` float32 each), B teacher-forced.
    Raw-text examples (no prompt) count every position but the last."""
    out = []
    for e in examples:
        enc = encode(e, tokenizer, eot_id, max_length)
        labels = torch.tensor(enc.labels)
        # position i predicts token i + 1; the end-of-turn label is not an answer token
        keep = (labels[1:] != IGNORE) & (torch.tensor(enc.input_ids[1:]) != eot_id)
        at = keep.nonzero().squeeze(-1)
        if at.numel() == 0:
            continue
        ids = torch.tensor([enc.input_ids])
        logits = model_b(input_ids=ids).logits[0, at].float()
        out.append(torch.log_softmax(logits, dim=-1) @ fmap.T)
    return out


def fit_scope_gate(
    model_b: Any,
    head_weight: torch.Tensor,
    tokenizer: Any,
    eot_id: int,
    in_scope: Sequence[Example],
    out_of_scope: Sequence[Example],
    *,
    l2: float,
    threshold: float,
    max_length: int,
) -> tuple[ScopeGate, dict[str, Any]]:
    """The gate for these examples, and its record for the manifest (counts and the
    training accuracy per class; never text). ``model_b`` is B (a callable taking
    ``input_ids``), ``head_weight`` its output head's weight.

    Raises:
        ValueError: no position in one of the two classes, or ``l2`` < 0.
    """
    if l2 < 0:
        raise ValueError(f"the scope gate's l2 must be ≥ 0, not {l2}")
    fmap = feature_map(head_weight)
    pos = answer_rows_features(model_b, tokenizer, eot_id, in_scope, fmap, max_length)
    neg = answer_rows_features(model_b, tokenizer, eot_id, out_of_scope, fmap, max_length)
    if not pos or not neg:
        raise ValueError("the scope gate needs answer positions in scope and out of scope")
    x = torch.cat([*pos, *neg]).double()
    y = torch.cat([torch.ones(sum(len(p) for p in pos)), torch.zeros(sum(len(n) for n in neg))]).double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    n_pos, n_neg = float(y.sum()), float((1 - y).sum())
    weights = torch.where(y > 0, 0.5 / n_pos, 0.5 / n_neg)
    v = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = xs @ v + b
        loss = (weights * torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")).sum()
        loss = loss + l2 * (v * v).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        z = xs @ v + b
        hit = (torch.sigmoid(z) >= threshold).double()
        scaled = v / sd
        weight = (scaled.float() @ fmap).numpy().astype(np.float32)  # w = (Q·W⁺)ᵀ·(v / sd)
        bias = float(b - (scaled * mu).sum())
    gate = ScopeGate(weight, bias, threshold)
    report = {
        "threshold": threshold,
        "l2": l2,
        "positions_in_scope": int(n_pos),
        "positions_out_of_scope": int(n_neg),
        "examples_in_scope": len(pos),
        "examples_out_of_scope": len(neg),
        "train_open_in_scope": round(float((hit * y).sum() / n_pos), 4),
        "train_open_out_of_scope": round(float((hit * (1 - y)).sum() / n_neg), 4),
    }
    logger.info("scope gate: %s", report)
    return gate, report
