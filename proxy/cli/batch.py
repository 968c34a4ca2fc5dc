"""``deltaproxy batch``: an OpenAI Batch API input file through the served models (resumable)."""

from __future__ import annotations

import argparse
import os

from proxy.cli.common import config_of, served_models
from proxy.cli.workers import BatchWorker, on_ray
from proxy.config import ConfigError
from proxy.jobs.batch import BatchInputError, BatchRunner


async def run(args: argparse.Namespace) -> int:
    """Run every line not yet in ``--out`` (here, or on Ray with ``--engine ray``); prints the counts.

    Raises:
        ConfigError: a bad input file, concurrency or config.
    """
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    if not os.path.isfile(args.inp):
        raise ConfigError(f"--in: {args.inp} is not a file")
    config = config_of(args)
    ray = on_ray(args, config, args.concurrency, BatchWorker)
    # Under Ray the workers hold the models; this process answers only bad lines.
    models = {} if ray is not None else served_models(config)
    try:
        summary = await BatchRunner(models, config.server).run(
            args.inp, args.out, concurrency=args.concurrency, progress=not args.no_progress, ray=ray, exclusive=True
        )
    except BatchInputError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        for model in models.values():
            await model.aclose()
    print(
        f"{summary.total} lines: {summary.completed} completed, {summary.failed} failed"
        f" ({summary.skipped} from an earlier run) -> {args.out}",
        flush=True,
    )
    return 0
