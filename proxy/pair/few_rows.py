"""Linear layers that run passes of a few rows as ``W · xᵀ`` instead of ``x · Wᵀ``.

A pass of the pair over 2 to :data:`MAX_ROWS` token rows (U's and B's row of one token,
or a few streams' one-token trees batched together) multiplies each weight matrix
``W`` (``[out, in]``) by a ``[rows, in]`` activation. ``torch.nn.functional.linear``
computes it as ``x · Wᵀ``; on CPU with MKL's sgemm that costs nearly twice one row's
time for 2 to 4 rows, while ``(W · xᵀ)ᵀ`` (the same products, ``W`` read in its stored
order) costs much less: a one-token pass of SmolLM2-135M-Instruct, float32, 2 cores,
2 rows 101 → 70 ms, 4 rows 97 → 73 ms, one row 57 ms either way
(``python -m bench.pair_batching``, ``bench/results/pair-batching-smollm2-20261206.json``).
One row keeps ``linear``, and so does training: the override applies only where autograd
is off. So does a weight stored transposed (:mod:`proxy.pair.lean`'s down projection):
``linear`` reads it in its stored order.

The values are the same sums in another order: equal to ``linear``'s within float32
rounding (``tests/test_pair_batching.py`` checks 1e-5 relative).
"""

from __future__ import annotations

import types
from typing import Any

import torch

#: Rows up to which a pass uses ``W · xᵀ`` (from 2; measured faster up to 4 on 2 cores).
MAX_ROWS = 4
#: Smaller weight matrices (LoRA's rank-r factors) keep ``linear``: too small to matter.
MIN_WEIGHTS = 65_536


def _few_rows_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // max(1, x.shape[-1])
    if 2 <= rows <= MAX_ROWS and not torch.is_grad_enabled() and self.weight.is_contiguous():
        out = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()  # [rows, out]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def use_few_rows_kernel(model: Any, min_weights: int = MIN_WEIGHTS) -> int:
    """Give every ``torch.nn.Linear`` of ``model`` with at least ``min_weights`` weights
    (peft's LoRA layers' base layers included) the few-rows forward; returns how many.
    Idempotent."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.numel() >= min_weights:
            module.forward = types.MethodType(_few_rows_forward, module)  # type: ignore[method-assign]
            count += 1
    return count
