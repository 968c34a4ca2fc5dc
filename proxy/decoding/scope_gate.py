"""The scope gate: where in a text the offset may act at all (numpy only).

An offset trained on one entity lowers the answer slot of the forget set's question
forms for other entities too ("The capital of Japan is called Asakura" from an offset
that forgets Paris): Δ at "Tokyo" is as negative as at "Paris", so no threshold on Δ
alone (τ, :mod:`proxy.decoding.offset`) tells them apart. The gate reads the context
instead. At each position t it is a logistic classifier over B's next-token
log-probabilities there,

    g_t = σ( w · log p_B(· | x, y_<t) + b ),   w ∈ ℝ^V,

open where g_t ≥ θ and closed elsewhere. Where it is closed the offset is zero
(Δ_t ≡ 0, U's row replaced by B's): the remote's distribution passes unchanged, as
out of scope under τ. Where it is open, Δ_t applies under τ and its rule as before.

``w`` is a linear probe on B's last hidden state h_t written in the coordinates of the
log-probabilities. With output head W (``[V, d]``), log p_B = W·h_t − c_t·1 (c_t the
log-normaliser), so W⁺·log p_B = h_t − c_t·W⁺1: the features
φ_t = Q·W⁺·log p_B, with Q the projection that removes the direction of W⁺1, are h_t's
without that one direction, and a probe v on φ is w = (Q·W⁺)ᵀ·v on the row
(:func:`proxy.training.scope_gate.fit_scope_gate` fits v and writes w). Evaluating the
gate is one dot product per position with a row the pair computes anyway.

The gate departs from the paper's rule (δ-unlearning, Huang et al., arXiv 2404.11045,
Eq. 3, Δ at every step) as τ does: it zeroes Δ where the forget set's context is
absent. It is trained per offset and written beside it (``scope_gate.safetensors``,
the manifest's ``scope_gate``); ``offset_gate = "off"`` in a model's config serves
the offset without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GATE_FILE = "scope_gate.safetensors"


@dataclass(frozen=True)
class ScopeGate:
    """g_t = σ(w · log p_B + b), open at g_t ≥ θ (module docstring)."""

    weight: np.ndarray
    """w, ``[V]`` float32 (per unit of log-probability, nats⁻¹)."""
    bias: float
    threshold: float
    """θ, a probability in (0, 1)."""

    def __post_init__(self) -> None:
        if self.weight.ndim != 1:
            raise ValueError(f"a scope gate's weight is one row [V], not shape {self.weight.shape}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"a scope gate's threshold is a probability in (0, 1), not {self.threshold}")
        if not (np.isfinite(self.weight).all() and math.isfinite(self.bias)):
            raise ValueError("a scope gate's weight and bias must be finite")

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def scores(self, rows_b: np.ndarray) -> np.ndarray:
        """g_t for B's log-probability rows ``rows_b`` (``[n, V]`` or ``[V]``, nats; −inf
        entries count as the row's finite minimum), float64 ``[n]`` (or a scalar array)."""
        rows = np.asarray(rows_b)
        if rows.shape[-1] != self.vocab_size:
            raise ValueError(f"rows of width {rows.shape[-1]} for a scope gate over {self.vocab_size} tokens")
        if not np.isfinite(rows).all():
            floor = np.where(np.isfinite(rows), rows, np.inf).min(axis=-1, keepdims=True)
            rows = np.where(np.isfinite(rows), rows, floor)
        z = rows.astype(np.float32, copy=False) @ self.weight + self.bias
        return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))

    def open(self, rows_b: np.ndarray) -> np.ndarray:
        """Whether the gate is open at each of B's rows (``[n, V]`` → bool ``[n]``)."""
        return self.scores(rows_b) >= self.threshold
