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
φ_t = Q·W⁺·log p_B = Q·h_t (the module docstring of :mod:`proxy.decoding.scope_gate`;
:class:`HeadMap`), fitted by L-BFGS (torch); the probe is then written in the coordinates
of the log-probabilities. The features come from B's last hidden state, so fitting costs
one forward pass of B per batch of examples without its output head.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from proxy.decoding.scope_gate import ScopeGate
from proxy.training.data import IGNORE, Example, encode
from proxy.training.prefix import shared_hidden

logger = logging.getLogger(__name__)


class HeadMap:
    """The maps between B's last hidden state h, its log-probability rows and the gate's
    features for output head W (``[V, d]``, full column rank; module docstring of
    :mod:`proxy.decoding.scope_gate`): with G = WᵀW and û the unit vector along
    W⁺1 = G⁻¹Wᵀ1, Q = I − ûûᵀ, the features are φ = Q·h = Q·W⁺·log p_B, and a probe s
    on φ is the row weight w = W·G⁻¹·Q·s (w · log p_B = s · φ: the log-normaliser moves
    along W⁺1, which Q removes). No pseudo-inverse is formed: one d × d solve."""

    def __init__(self, head_weight: torch.Tensor) -> None:
        w = head_weight.detach().to(torch.float64)  # [V, d]
        self.head = w
        self.gram = w.T @ w  # [d, d]
        one = torch.linalg.solve(self.gram, w.sum(0))  # W⁺1
        self.unit = one / one.norm() if one.norm() > 0 else one

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Q·x for rows ``x`` (``[n, d]``)."""
        u = self.unit.to(x.dtype)
        return x - (x @ u)[:, None] * u[None, :]

    def row_map(self) -> torch.Tensor:
        """``[V, d]`` float32 M with ``rows @ M`` = φ for log-probability rows ``[n, V]``
        (M = W·G⁻¹·Q): the features of a head that is not a plain linear map of h."""
        return (self.head @ torch.linalg.solve(self.gram, self.project(torch.eye(self.gram.shape[0], dtype=torch.float64)))).float()

    def row_weight(self, s: torch.Tensor) -> torch.Tensor:
        """w = W·G⁻¹·Q·s, ``[V]`` float64, for a probe ``s`` (``[d]``) on φ."""
        qs = self.project(s.to(torch.float64)[None, :])[0]
        return self.head @ torch.linalg.solve(self.gram, qs)


#: Examples per forward pass of B when the gate's features are computed.
FEATURE_BATCH = 16


@torch.no_grad()
def answer_rows_features(
    model_b: Any,
    tokenizer: Any,
    eot_id: int,
    examples: Sequence[Example],
    head: HeadMap,
    max_length: int,
    batch_size: int = FEATURE_BATCH,
    known: Mapping[tuple[int, ...], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """φ at the answer positions of each example (``[n_i, d]`` float32 each, in the order of
    ``examples``, examples without one left out), B teacher-forced in right-padded batches.
    Raw-text examples (no prompt) count every position but the last.

    φ = Q·h from B's last hidden state where that equals Q·W⁺·log p_B (a bias-free linear
    head, checked on the first batch against the rows: the output head is then not run at
    all), else from the log-probability rows (a head with a bias, a soft cap or a scale).
    ``known`` holds B's last hidden states (``[L, d]``) of sequences already run, by token
    ids (training's reference passes, taken only where the head is plain): those are not run again."""
    items = []
    for k, e in enumerate(examples):
        enc = encode(e, tokenizer, eot_id, max_length)
        labels = torch.tensor(enc.labels)
        # position i predicts token i + 1; the end-of-turn label is not an answer token
        keep = (labels[1:] != IGNORE) & (torch.tensor(enc.input_ids[1:]) != eot_id)
        at = keep.nonzero().squeeze(-1)
        if at.numel():
            items.append((k, enc.input_ids, at))
    found: dict[int, torch.Tensor] = {}
    if known:
        for k, row_ids, at in items:
            h = known.get(tuple(row_ids))
            if h is not None:
                found[k] = head.project(h[at].double()).float()
        items = [it for it in items if it[0] not in found]
    order = sorted(range(len(items)), key=lambda i: len(items[i][1]))  # rows of similar length pad little
    rows_map: torch.Tensor | None = None
    from_hidden: bool | None = None  # decided on the first batch
    for start in range(0, len(order), batch_size):
        part = [items[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for _, ids, _ in part)
        ids = torch.full((len(part), width), eot_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for r, (_, row, _) in enumerate(part):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        hidden = shared_hidden(model_b, ids, mask) if from_hidden else None  # the rows' shared prompt once
        if hidden is None:
            full = from_hidden is None or not from_hidden
            out = model_b(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, **({} if full else {"logits_to_keep": 1})
            )
            hidden = out.hidden_states[-1]
        for r, (k, _, at) in enumerate(part):
            phi_h = head.project(hidden[r, at].double()).float()
            if from_hidden:  # decided: the rows are not needed
                found[k] = phi_h
                continue
            if rows_map is None:
                rows_map = head.row_map()
            phi_rows = torch.log_softmax(out.logits[r, at].float(), -1) @ rows_map
            if from_hidden is None:
                scale = float(phi_rows.abs().max()) or 1.0
                from_hidden = bool((phi_rows - phi_h).abs().max() <= 1e-2 * scale)
                if not from_hidden:
                    logger.info("scope gate: the output head is not a plain linear map; features from the rows")
            found[k] = phi_h if from_hidden else phi_rows
    return [found[k] for k in sorted(found)]


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
    known: Mapping[tuple[int, ...], torch.Tensor] | None = None,
) -> tuple[ScopeGate, dict[str, Any]]:
    """The gate for these examples, and its record for the manifest (counts and the
    training accuracy per class; never text). ``model_b`` is B (a callable taking
    ``input_ids``), ``head_weight`` its output head's weight; ``known``: B's last hidden
    states already computed, by token ids (:func:`answer_rows_features`).

    Raises:
        ValueError: no position in one of the two classes, or ``l2`` < 0.
    """
    if l2 < 0:
        raise ValueError(f"the scope gate's l2 must be ≥ 0, not {l2}")
    head = HeadMap(head_weight)
    pos = answer_rows_features(model_b, tokenizer, eot_id, in_scope, head, max_length, known=known)
    neg = answer_rows_features(model_b, tokenizer, eot_id, out_of_scope, head, max_length, known=known)
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
        weight = head.row_weight(scaled).numpy().astype(np.float32)  # w = W·G⁻¹·Q·(v / sd)
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
