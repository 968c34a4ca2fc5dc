"""What training an offset costs, phase by phase, and what computing a batch's shared
prefixes once saves, in one run.

    python -m bench.training_speed [--json FILE] [--steps 6] [--no-full]

- **steps**: the demo's first ``--steps`` optimizer steps (the demo forget set with
  ``deltaproxy train``'s defaults: its scope sets, its plan), run twice from the same
  adapter: every row of a batch computed whole (the baseline), then the tokens the rows
  share at their start computed once (:mod:`proxy.training.prefix`). Seconds per step
  each and their ratio (``step_speedup_shared_prefixes``), the token positions computed
  each way, and the largest difference between the two runs' losses (the same function
  of the weights: float rounding only).
- **full**: ``train`` with the demo's settings, as the first ``make run`` trains it
  (:data:`proxy.training.demo.DEMO`), seconds per phase: loading, the scope sets (B's
  answers, the neighbours), the plan, the optimizer, the scope gate and the self-check,
  and in all (``train_seconds``).

Absolute times on 2 shared cores vary by about ±10% from run to run; the ratio is of
runs in this process.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")


def _steps(cfg: Any, steps: int) -> dict[str, Any]:
    """The first ``steps`` optimizer steps of ``cfg``'s plan, without and with shared prefixes."""
    import torch

    import proxy.training.targets as targets
    from proxy.pair.artifact import weights_sha256
    from proxy.training.data import load_dataset
    from proxy.training.plan import build_plan
    from proxy.training.prefix import plan_prefixes
    from proxy.training.scope_sets import build_scope_sets
    from proxy.training.train import _trainable_model

    objective = cfg.validate()
    forget = load_dataset(cfg.forget)
    base, tokenizer, _, vocab = targets.load_models(cfg)
    scope = build_scope_sets(cfg, forget, base, tokenizer, vocab, weights_sha256(base))
    plan = build_plan(cfg, objective, forget, None, scope, tokenizer, vocab)
    batches: list[Any] = []
    epoch = 0
    while len(batches) < steps:
        batches += list(plan.batches(epoch))
        epoch += 1
    batches = batches[:steps]

    def positions(batch: dict[str, torch.Tensor] | None) -> tuple[int, int]:
        if batch is None:
            return 0, 0
        rows = [r[: int(n)].tolist() for r, n in zip(batch["input_ids"], batch["attention_mask"].sum(-1), strict=True)]
        split = plan_prefixes(rows)
        whole = batch["input_ids"].numel()
        return whole, split.computed if split is not None else whole

    counted = [positions(part) for b in batches for part in (b.forget, b.retain)]
    run: dict[str, Any] = {
        "steps": steps,
        "positions_whole": sum(w for w, _ in counted),
        "positions_shared": sum(s for _, s in counted),
    }
    losses: dict[str, list[float]] = {}
    original = targets.shared_hidden
    for mode in ("whole", "shared"):
        targets.shared_hidden = original if mode == "shared" else (lambda *a, **k: None)  # type: ignore[assignment]
        try:
            torch.manual_seed(cfg.seed)
            model, reference = _trainable_model(cfg, copy.deepcopy(base))
            scorer = targets.CombinedScorer(model, None, reference)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=cfg.lr)
            started = time.monotonic()
            scorer.reference_pass([*plan.forget, *plan.idk], plan.pad_id)
            run[f"reference_pass_seconds_{mode}"] = round(time.monotonic() - started, 2)
            started = time.monotonic()
            losses[mode] = []
            for b in batches:
                loss = objective(scorer, b)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses[mode].append(loss.item())
            run[f"seconds_per_step_{mode}"] = round((time.monotonic() - started) / steps, 2)
        finally:
            targets.shared_hidden = original
    run["step_speedup_shared_prefixes"] = round(run["seconds_per_step_whole"] / run["seconds_per_step_shared"], 3)
    run["max_loss_difference"] = max(abs(a - b) for a, b in zip(losses["whole"], losses["shared"], strict=True))
    run["losses"] = losses
    return run


def _timed(module: Any, name: str, times: dict[str, float], label: str) -> Callable[[], None]:
    """Wrap ``module.name`` to add its seconds to ``times[label]``; returns the undo."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            times[label] = times.get(label, 0.0) + time.monotonic() - started

    setattr(module, name, wrapper)
    return lambda: setattr(module, name, original)


def _full(cfg: Any) -> dict[str, Any]:
    """``train(cfg)`` into a temporary folder, seconds per phase."""
    import proxy.training.train as train_module

    times: dict[str, float] = {}
    phases = {
        "load_models": "load",
        "build_scope_sets": "scope_sets",
        "build_plan": "plan",
        "_optimize": "optimizer",
        "_scope_gate": "scope_gate",
        "_self_check": "self_check",
    }
    undo = [_timed(train_module, name, times, label) for name, label in phases.items()]
    try:
        with tempfile.TemporaryDirectory() as work:
            started = time.monotonic()
            train_module.train(replace(cfg, out=str(Path(work) / "offset")), progress=False)
            total = time.monotonic() - started
    finally:
        for u in undo:
            u()
    return {"train_seconds": round(total, 1), "phase_seconds": {k: round(v, 1) for k, v in times.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.training_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per way of computing them")
    ap.add_argument("--no-full", action="store_true", help="skip the whole training run")
    args = ap.parse_args(argv)
    from proxy.training.demo import DEMO

    result: dict[str, Any] = {"date": dt.date.today().isoformat(), "forget": Path(DEMO.forget).name}
    result["steps"] = _steps(DEMO, args.steps)
    if not args.no_full:
        result["full"] = _full(DEMO)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
