"""``deltaproxy redact``: forget-scope content masked or rewritten in outputs written before
unlearning, and ``redact calibrate`` to pick its threshold."""

from __future__ import annotations

import argparse
import json
import os

from proxy.cli.common import config_of, one_model
from proxy.cli.workers import RedactWorker, on_ray
from proxy.config import ConfigError
from proxy.redaction.redact import redact_file
from proxy.redaction.scoring import RedactError, score_file
from proxy.redaction.spans import calibrate


async def run(args: argparse.Namespace) -> int:
    """Redact ``--in`` into ``--out`` (resumable), or with ``calibrate`` print the threshold
    that flags ``--fpr`` of the characters.

    Raises:
        ConfigError: bad files, settings or model.
    """
    if not os.path.isfile(args.inp):
        raise ConfigError(f"--in: {args.inp} is not a file")
    if args.action is None and not args.out:
        raise ConfigError("--out is required (or use 'redact calibrate')")
    if args.max_tokens < 1:
        raise ConfigError("--max-tokens must be at least 1")
    config = config_of(args)
    name, model = one_model(args, config)
    try:
        if args.action == "calibrate":
            texts, scores = await score_file(model, args.inp)
            t, fpr = calibrate(texts, scores, args.fpr)
            print(
                json.dumps(
                    {
                        "model": name,
                        "threshold": round(t, 4),
                        "flagged_fraction": round(fpr, 5),
                        "target_fpr": args.fpr,
                        "outputs": len(texts),
                        "characters": sum(map(len, texts)),
                    }
                )
            )
            return 0
        threshold = args.threshold if args.threshold is not None else model.offset_threshold
        if threshold is None:
            raise ConfigError(f"--threshold is required: model {name!r} has no offset_threshold")
        ray = on_ray(args, config, 1, RedactWorker, name, threshold, args.mode, args.marker, args.max_tokens)
        counts = await redact_file(
            model,
            args.inp,
            args.out,
            threshold=threshold,
            mode=args.mode,
            marker=args.marker,
            max_tokens=args.max_tokens,
            progress=not args.no_progress,
            ray=ray,
        )
    except RedactError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        await model.aclose()
    print(
        f"{counts['total']} lines: {counts['redacted']} redacted, {counts['clean']} clean, {counts['failed']} failed"
        f" ({counts['skipped']} from an earlier run) -> {args.out}",
        flush=True,
    )
    return 0
