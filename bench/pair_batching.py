"""What batching the pair's forward passes across requests could buy on this machine.

    python -m bench.pair_batching [--json FILE]

Times one forward pass of the pair's base model (SmolLM2-135M-Instruct, float32,
transformers) over ``n`` new tokens per row after a 150-token KV cache, for
``rows`` rows at once, and reports per-row throughput against one row:
``speedup = rows · t(1, n) / t(rows, n)``. Token-by-token decoding scores one
token per step (``n = 1``); an out-of-scope speculative draft scores a whole
answer at once (``n`` near 128), where a single row already keeps the cores busy.
Best of 3 repetitions each, in one process.

``few_rows``: one-token passes of 1 to 32 rows with ``linear`` (``x · Wᵀ``) and with the
pair's few-rows kernel (``W · xᵀ``, :mod:`proxy.pair.few_rows`), through transformers'
modules, on the same model in the same run, best of 5 rounds of the two alternating.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import report

CACHE_TOKENS = 150
SHAPES = ((1, 1), (4, 1), (16, 1), (1, 8), (16, 8), (1, 32), (4, 32), (1, 96), (16, 96), (1, 128), (4, 128))
#: One-token passes of 1 to 32 rows (U's and B's rows of one token, a few streams), timed with
#: ``torch.nn.functional.linear`` and with :mod:`proxy.pair.few_rows`'s ``W · xᵀ``, alternating.
FEW_ROWS = (1, 2, 4, 8, 16, 32)


def forward_ms(
    model: Any, rows: int, n: int, *, cache_tokens: int = CACHE_TOKENS, reps: int = 3, lean: Any = None
) -> float:
    """Best of ``reps`` wall times (ms) of one forward pass of ``model`` (a causal LM with
    ``.model`` and ``.lm_head``) over ``n`` new tokens in each of ``rows`` rows after
    ``cache_tokens`` cached ones, the output head at each row's last position; with ``lean``
    (the model's :class:`proxy.pair.lean.LeanDecoder`) its body instead of the modules, each
    row on its own cache, as the pair runs it."""
    import torch
    from transformers import DynamicCache

    if lean is not None:
        return _lean_ms(model, lean, rows, n, cache_tokens=cache_tokens, reps=reps)
    with torch.inference_mode():
        cache = DynamicCache()
        model.model(input_ids=torch.randint(0, 1000, (rows, cache_tokens)), past_key_values=cache, use_cache=True)
        times = []
        for _ in range(reps):
            ids = torch.randint(0, 1000, (rows, n))
            t0 = time.perf_counter()
            hidden = model.model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
            model.lm_head(hidden[:, -1:])
            times.append(time.perf_counter() - t0)
            cache.crop(-n)
    return 1000 * min(times)


def _lean_ms(model: Any, lean: Any, rows: int, n: int, *, cache_tokens: int, reps: int) -> float:
    import torch
    from transformers import DynamicCache

    def causal(held: int, new: int) -> torch.Tensor:
        allowed = torch.ones((new, held + new), dtype=torch.bool).tril(held)
        return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)

    with torch.inference_mode():
        caches = [DynamicCache() for _ in range(rows)]
        for cache in caches:
            ids = torch.randint(0, 1000, (1, cache_tokens))
            lean.rows(ids, torch.arange(cache_tokens)[None], [causal(0, cache_tokens)], [cache], None)
        positions = (torch.arange(n) + cache_tokens)[None].expand(rows, n)
        times = []
        for _ in range(reps):
            ids = torch.randint(0, 1000, (rows, n))
            t0 = time.perf_counter()
            hidden = lean.rows(ids, positions, [causal(cache_tokens, n)] * rows, caches, None)
            model.lm_head(hidden[:, -1:])
            times.append(time.perf_counter() - t0)
            for cache in caches:
                cache.crop(-n)
    return 1000 * min(times)


def speedup(model: Any, rows: int, n: int, lean: Any = None) -> float:
    """Throughput of ``rows`` rows in one pass over one row's: ``rows · t(1, n) / t(rows, n)``
    (``lean``: see :func:`forward_ms`)."""
    return rows * forward_ms(model, 1, n, lean=lean) / forward_ms(model, rows, n, lean=lean)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pair_batching", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from proxy.pair.few_rows import use_few_rows_kernel
    from proxy.pair.model_files import local_model_dir

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(local_model_dir("smollm2"), dtype=torch.float32).eval()

    ms = {(rows, n): forward_ms(model, rows, n) for rows, n in SHAPES}
    few: dict[int, dict[str, float]] = {rows: {"linear": float("inf"), "few_rows": float("inf")} for rows in FEW_ROWS}
    for _ in range(5):
        for kernel in ("linear", "few_rows"):
            plain = AutoModelForCausalLM.from_pretrained(local_model_dir("smollm2"), dtype=torch.float32).eval()
            if kernel == "few_rows":
                use_few_rows_kernel(plain)
            for rows in FEW_ROWS:
                few[rows][kernel] = min(few[rows][kernel], forward_ms(plain, rows, 1))
            del plain
    out = {
        "threads": torch.get_num_threads(),
        "cache_tokens": CACHE_TOKENS,
        "runs": [
            {"rows": rows, "new_tokens": n, "ms": round(t, 1), "speedup": round(rows * ms[(1, n)] / t, 2)}
            for (rows, n), t in ms.items()
        ],
        "few_rows": [
            {
                "rows": rows,
                "linear_ms": round(t["linear"], 1),
                "few_rows_ms": round(t["few_rows"], 1),
                "speedup": round(t["linear"] / t["few_rows"], 2),
            }
            for rows, t in few.items()
        ],
    }
    report(out, args.json)


if __name__ == "__main__":
    main()
