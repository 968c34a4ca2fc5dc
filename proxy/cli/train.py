"""``deltaproxy train``: an offset artifact from a forget set, then its self-check."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from adapters.base import RemoteError
from proxy.config import ConfigError
from proxy.training.config import TrainConfig
from proxy.training.train import train


def run(args: argparse.Namespace) -> int:
    """Train, print the artifact's path and its self-check; 0 once the artifact is written.

    Raises:
        ConfigError: bad data or settings, an existing ``--out``, or a failing remote.
    """
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        path = train(cfg)
    except (FileExistsError, ValueError) as exc:  # DataError is a ValueError: bad data, bad settings
        raise ConfigError(str(exc)) from exc
    except RemoteError as exc:  # --mode remote: the vLLM server failed (nothing was written)
        raise ConfigError(f"--remote: {exc}") from exc
    print(f"offset artifact: {path}", flush=True)
    return print_self_check(path)


def print_self_check(path: Path) -> int:
    """The self-check of a trained artifact, on stdout (a line each) and its warnings on
    stderr; 0 either way (the artifact is written), the warnings say what to change."""
    manifest = json.loads((path / "manifest.json").read_text())
    report = manifest.get("self_check")
    if report is None:
        return 0
    print(
        f"scope threshold τ = {report['offset_threshold']:.3f} nats, rule {report.get('offset_scope', 'step')} "
        f"({report['calibration_unchanged']:.0%} of {report['calibration_prompts']} calibration answers unchanged"
        f"{' through the scope gate' if report.get('tau_through_gate') else ''})"
    )
    gate = manifest.get("scope_gate")
    if gate is not None:
        print(
            f"scope gate θ = {gate['threshold']}, open on {gate['train_open_in_scope']:.0%} of "
            f"{gate['positions_in_scope']} in-scope and {gate['train_open_out_of_scope']:.1%} of "
            f"{gate['positions_out_of_scope']} out-of-scope training positions"
        )
    rows = [
        ("forget-set ROUGE-L recall, without → with the offset",
         f"{report['forget_rouge_l_recall_base']} → {report['forget_rouge_l_recall_offset']}"),
        *([("forget answers' fact words recalled, without → with the offset",
            f"{report['forget_fact_recall_base']} → {report['forget_fact_recall_offset']}")]
          if report.get("forget_fact_recall_base") is not None else []),
        ("held-out general answers unchanged", f"{report['check_unchanged']} of {report['check_prompts']}"),
        ("held-out neighbour answers unchanged", f"{report['neighbour_unchanged']} of {report['neighbour_prompts']}"),
        ("fluency (B's nats/token), B's answers → the offset's",
         f"{report['fluency_base']} → {report['fluency_offset']}"),
    ]  # fmt: skip
    for what, value in rows:
        print(f"  {what}: {value}")
    for warning in report["warnings"]:
        print(f"deltaproxy: train: warning: {warning}", file=sys.stderr)
    print("self-check: " + ("ok" if report["ok"] else "FAILED (the offset is written; see the warnings)"))
    return 0
