"""How long an audit of the tofu-lite forget items takes through the δ row, and what
batching the in-process remote's drafts across requests saves, in one run.

    python -m bench.audit_speed [--samples 100] [--baseline-samples 10] [--concurrency 4] [--json FILE]

The δ row of ``bench.tofu`` with the training defaults' offset (``--offset-settings '{}'``,
trained once and cached): the fine-tuned tofu-lite target in-process as the remote
(:class:`adapters.transformers_inprocess.TransformersInProcessAdapter`), the packaged
SmolLM2 with the offset as the pair, the audit engine's default concurrency.

- **baseline**: the 10 forget items with ``--baseline-samples`` T = 1 answers each (and the
  greedy answer, the extraction answer and the probability metrics), twice: the remote's
  drafts one request at a time (each request's tokens a pass of their own), then batched
  (every waiting request's next token a row of one pass, :mod:`adapters.step_batcher`).
  Seconds each and their ratio (``batched_speedup``), and the rows per batched pass.
- **audit**: the same items with ``--samples`` answers each, batched, in seconds
  (``audit_seconds``): what ``python -m bench.tofu --rows delta:NPO+KL --offset-settings
  '{}' --samples 100 --extraction-samples 0`` spends on its forget items.

Absolute times on a shared 2-core machine vary by up to 1.5× between runs; the ratio is
of runs in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import tempfile
import time
from pathlib import Path
from typing import Any

ROW = "delta:NPO+KL"


async def _audit(model: Any, forget: str, samples: int, work: Path, concurrency: int = 4) -> float:
    from proxy.evaluation.items import AuditSettings
    from proxy.evaluation.run import run_audit

    settings = AuditSettings(samples=samples, extraction_samples=0, concurrency=concurrency)
    started = time.monotonic()
    await run_audit(model, {"forget": forget}, work, settings=settings, progress=False)
    return time.monotonic() - started


async def run(samples: int, baseline_samples: int, concurrency: int) -> dict[str, Any]:
    from bench.tofu import _row_model
    from bench.tofu_models import FinetuneSettings, build, default_data

    data = default_data()
    paths = build(data, FinetuneSettings())
    adapters: dict[str, Any] = {}
    model, facts = await _row_model(ROW, paths, data, adapters, 48, {})
    remote = model.adapter
    steps = remote._steps
    if steps is None:
        raise SystemExit("the target's model is not one the lean body takes: nothing to batch")
    forget = str(data / "forget10.jsonl")
    out: dict[str, Any] = {"row": ROW, "offset": facts.get("offset"), "items": 10}
    with tempfile.TemporaryDirectory() as tmp:
        await _audit(model, forget, 1, Path(tmp) / "warm")  # load kernels and caches once
        if baseline_samples:
            remote._steps = None
            one_at_a_time = await _audit(model, forget, baseline_samples, Path(tmp) / "serial")
            remote._steps = steps
            before = (steps.batches, steps.jobs)
            batched = await _audit(model, forget, baseline_samples, Path(tmp) / "batched")
            passes, rows = steps.batches - before[0], steps.jobs - before[1]
            out["baseline"] = {
                "samples": baseline_samples,
                "seconds_one_at_a_time": round(one_at_a_time, 1),
                "seconds_batched": round(batched, 1),
                "batched_speedup": round(one_at_a_time / batched, 2),
                "rows_per_remote_pass": round(rows / max(1, passes), 2),
            }
        if samples:
            out["audit"] = {
                "samples": samples,
                "concurrency": concurrency,
                "audit_seconds": round(await _audit(model, forget, samples, Path(tmp) / "full", concurrency), 1),
            }
    for a in adapters.values():
        await a.aclose()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.audit_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--samples", type=int, default=100, help="T=1 answers per forget item in the timed audit (0: skip it)"
    )
    ap.add_argument(
        "--baseline-samples", type=int, default=10, help="T=1 answers per item in the comparison (0: skip it)"
    )
    ap.add_argument(
        "--concurrency", type=int, default=4, help="the timed audit's --concurrency (default 4, the audit's own)"
    )
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)
    result = {
        "date": dt.date.today().isoformat(),
        **asyncio.run(run(args.samples, args.baseline_samples, args.concurrency)),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
