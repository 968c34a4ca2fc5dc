"""``deltaproxy calibrate-threshold``: the scope threshold τ that keeps a stated fraction of
out-of-scope prompts' greedy answers exactly as without the offset."""

from __future__ import annotations

import argparse
import json

from proxy.cli.common import config_of, one_model
from proxy.config import ConfigError
from proxy.decoding.threshold import pick_threshold, scope_margin
from proxy.training.data import DataError, load_dataset


async def run(args: argparse.Namespace) -> int:
    """Greedy answers to ``--prompts`` with and without the offset; prints τ as JSON.

    Raises:
        ConfigError: bad prompts, settings or model.
    """
    if not 0 < args.unchanged <= 1:
        raise ConfigError("--unchanged must be in (0, 1]")
    if args.max_tokens < 1:
        raise ConfigError("--max-tokens must be at least 1")
    try:
        prompts = [list(ex.prompt) for ex in load_dataset(args.prompts).examples if ex.prompt is not None]
    except (DataError, OSError) as exc:
        raise ConfigError(f"--prompts: {exc}") from exc
    if not prompts:
        raise ConfigError("--prompts: no chat prompts (question/answer or messages lines)")
    config = config_of(args)
    name, model = one_model(args, config)
    try:
        margins = []
        for messages in prompts:
            try:
                margins.append(await scope_margin(model, messages, args.max_tokens))
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
    finally:
        await model.aclose()
    tau = pick_threshold(margins, args.unchanged)
    print(
        json.dumps(
            {
                "model": name,
                "offset_threshold": round(tau, 4),
                "offset_scope": model.offset_scope,
                "unchanged_target": args.unchanged,
                "unchanged_at_threshold": round(sum(m < tau for m in margins) / len(margins), 4),
                "prompts": len(margins),
                "margins": sorted(round(m, 3) for m in margins),
            }
        )
    )
    return 0
