"""Linear layers that run inference passes of a few rows as ``W · xᵀ`` instead of ``x · Wᵀ``.

A pass of the pair over up to :data:`MAX_ROWS` token positions (U's and B's row of one
token, a few streams' one-token trees batched together, a short draft) multiplies each
weight matrix ``W`` (``[out, in]``) by a ``[rows, in]`` activation.
``torch.nn.functional.linear`` computes it as ``x · Wᵀ``; on CPU with MKL's sgemm that
runs far below the memory bandwidth for few rows, while ``(W · xᵀ)ᵀ`` (the same
products, ``W`` read in its stored order) runs at it. One row is the worst case: MKL
takes a matrix-vector path at about a third of the bandwidth, so a single row is
computed as two (the row twice) and the first taken. Measured on 2 cores, SmolLM2-135M's
30 layers' products, float32 (best of 9, one process):

=====  =========================  ==========================
rows   ``linear`` (ms)            ``W · xᵀ`` (ms)
=====  =========================  ==========================
1      36.0                       25.6 (the row twice)
2      57.8                       13.8
4      47.5                       18.7
8      49.4                       33.4
16     58.6                       39.7
64     134.0                      98.4
128    ``linear`` faster on the square and up projections
=====  =========================  ==========================

and the output head (49,152 × 576): one row 9.7 → 2.7 ms, two rows 21.4 → 2.7 ms.
``python -m bench.pair_batching`` times whole passes both ways.

Training keeps ``linear`` (the rule applies only where autograd is off), and so do
LoRA's rank-r factors (below :data:`MIN_WEIGHTS`). The values are the same sums in
another order: equal to ``linear``'s within float32 rounding
(``tests/test_pair_batching.py`` checks 1e-5 relative).
"""

from __future__ import annotations

import types
from typing import Any

import torch

#: Positions up to which an inference product uses ``W · xᵀ`` (measured faster up to 64
#: on 2 cores; at 128 ``linear`` wins on the larger matrices).
MAX_ROWS = 64
#: Smaller weight matrices (LoRA's rank-r factors) keep ``linear``: too small to matter.
MIN_WEIGHTS = 65_536


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · weightᵀ + bias`` (``x``: ``[rows, in]``, ``weight``: ``[out, in]``, ``bias``:
    ``[out]`` or ``None``; returns ``[rows, out]``), computed as ``(weight · xᵀ)ᵀ`` for 1 to
    :data:`MAX_ROWS` rows (one row as two, the first kept) where autograd is off and
    ``weight`` is contiguous, else exactly ``linear(x, weight, bias)``. ``x`` may have any
    strides (it is copied row-major where it is not)."""
    rows = x.shape[0]
    if rows > MAX_ROWS or torch.is_grad_enabled() or not weight.is_contiguous():
        return torch.nn.functional.linear(x, weight, bias)
    if rows == 1:
        y = torch.mm(weight, x.expand(2, -1).contiguous().t())[:, :1].t()  # xᵀ as a transposed view: MKL's fast case
    else:
        # xᵀ must be a transposed view of a row-major x: a column-major x (the transposed
        # output of an earlier product, or an elementwise result of one) made xᵀ row-major,
        # which MKL ran at a third of the speed (down projection of 2 rows: 16.8 → 6.9 ms
        # over 30 layers, the copy included).
        y = torch.mm(weight, x.contiguous().t()).t()
    return y if bias is None else y + bias


def _few_rows_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = product(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
    return out.reshape(*x.shape[:-1], self.out_features)


def use_few_rows_kernel(model: Any, min_weights: int = MIN_WEIGHTS) -> int:
    """Give every ``torch.nn.Linear`` of ``model`` with at least ``min_weights`` weights
    (peft's LoRA layers' base layers included) the few-rows forward (:func:`product`);
    returns how many. Idempotent."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.numel() >= min_weights:
            module.forward = types.MethodType(_few_rows_forward, module)  # type: ignore[method-assign]
            count += 1
    return count
