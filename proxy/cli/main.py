"""``deltaproxy`` command line: parse, run the command's module, turn errors into exit codes.

    deltaproxy serve [--config FILE] [--offset DIR | --no-offset] [--alpha A] [--offset-threshold T]
                     [--host H] [--port P]
    deltaproxy batch --in FILE --out FILE [--config FILE] [--concurrency N] [--engine local|ray]
    deltaproxy redact [calibrate] --in FILE [--out FILE] [--model NAME] [--threshold T] [--mode mask|regenerate]
                      [--engine local|ray]
    deltaproxy calibrate-threshold --prompts FILE [--unchanged 0.9] [--model NAME]
    deltaproxy audit --forget FILE [--retain FILE] [--holdout FILE] [--real-authors FILE] [--world-facts FILE]
                     [--reference DIR] [--policy FILE] --out DIR [--model NAME] [--samples N]
                     [--engine local|ray [--ray-address ADDR] [--workers N] [--cpus-per-worker C]]
    deltaproxy train --forget FILE [--retain FILE] --out DIR [--objective NAME] [--base MODEL]
                     [--mode proxy|exact|remote] [--remote NAME|URL] [--resume] [options]
    deltaproxy verify-log FILE... [--head SHA256]
    deltaproxy hash-key [--id NAME] [--models A,B] [--stdin]

``serve`` prints ``base_url: http://HOST:PORT/v1`` once it accepts requests. Exit status: 0
done; 1 an operating-system error, or ``--engine ray`` without Ray or with a failed worker;
2 a usage or configuration error (the message names the option or key); 3 ``audit``'s
``--policy`` failed; 130 interrupted. Without ``--config`` the
commands serve the embedded default, model ``smollm2-demo``, with the demo offset (trained on
first use, then cached; :func:`proxy.training.demo.demo_offset`).

Each command's code is imported only when it runs (:data:`COMMANDS`), so that ``hash-key``,
``verify-log`` and ``--help`` start without loading torch.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import sys

from proxy.cli.parser import build
from proxy.config import ConfigError
from proxy.gateway.request_log import AuditLogError
from proxy.jobs.ray_engine import EngineError

#: The module and function that run each command.
COMMANDS = {
    "serve": ("proxy.cli.serve", "run"),
    "train": ("proxy.cli.train", "run"),
    "batch": ("proxy.cli.batch", "run"),
    "redact": ("proxy.cli.redact", "run"),
    "calibrate-threshold": ("proxy.cli.threshold", "run"),
    "audit": ("proxy.cli.audit", "run"),
    "verify-log": ("proxy.cli.log_keys", "verify_log"),
    "hash-key": ("proxy.cli.log_keys", "hash_key"),
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring)."""
    args = build().parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    args.log_level = level
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module, name = COMMANDS[args.command]
    try:
        run = getattr(importlib.import_module(module), name)
        result = run(args)
        return asyncio.run(result) if inspect.iscoroutine(result) else result
    except (ConfigError, AuditLogError) as exc:
        print(f"deltaproxy: {args.command}: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"deltaproxy: {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "train":
            print("deltaproxy: train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"deltaproxy: {args.command}: {exc}", file=sys.stderr)
        return 1
