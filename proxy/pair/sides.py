"""The pair's two models as keys: :class:`Side` names U (the unlearned model, B + offset) or
B (the base model) wherever the local pair keeps something per model (KV caches, rows,
results of a pass), and :func:`sides` gives the models a pass runs."""

from __future__ import annotations

import enum


class Side(enum.Enum):
    """One model of the local pair."""

    U = "U"
    """The unlearned model U = B + offset: the base with its adapter layers on, or the second
    model of a fully fine-tuned (``"full"``) artifact."""
    B = "B"
    """The base model B: U with its adapter layers off, or the pair's one model without an offset."""


def sides(has_offset: bool) -> tuple[Side, ...]:
    """The models a pass runs, in order: U then B, or B alone without an offset (U = B, Δ ≡ 0)."""
    return (Side.U, Side.B) if has_offset else (Side.B,)
