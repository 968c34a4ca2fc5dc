"""``deltaproxy audit``: what a served model still reveals of a forget set and how well it
still does its job (``report.json`` and ``report.html``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

from proxy.cli.common import config_of, one_model
from proxy.cli.workers import AuditWorker, on_ray
from proxy.config import ConfigError
from proxy.evaluation.items import AuditError, AuditSettings, load_policy
from proxy.evaluation.run import run_audit


async def run(args: argparse.Namespace) -> int:
    """Audit the served model; prints the summary as JSON; 3 when ``--policy`` fails.

    Raises:
        ConfigError: bad items, policy, settings or model.
    """
    settings = AuditSettings(
        samples=args.samples,
        max_tokens=args.max_tokens,
        seed=args.seed,
        concurrency=args.concurrency,
        extraction_samples=args.extraction_samples,
    )
    files = {
        "forget": args.forget,
        "retain": args.retain,
        "holdout": args.holdout,
        "real_authors": args.real_authors,
        "world_facts": args.world_facts,
    }
    try:
        policy = load_policy(args.policy) if args.policy else None
        config = config_of(args)
        name, model = one_model(args, config)
        ray = on_ray(args, config, settings.concurrency, AuditWorker, name, settings)
        mc = config.models[name]
        info = {
            "name": name,
            "backend": mc.remote_backend,
            "provider": mc.provider,
            "remote": mc.remote_model or mc.gguf or mc.transformers_model or mc.remote_base_url,
            "pair": mc.pair,
            "config_sha256": hashlib.sha256(config.model_dump_json().encode()).hexdigest(),
        }
        try:
            report = await run_audit(
                model,
                {k: v for k, v in files.items() if v},
                args.out,
                settings=settings,
                reference=args.reference,
                policy=policy,
                info=info,
                progress=not args.no_progress,
                ray=ray,
            )
        finally:
            await model.aclose()
    except AuditError as exc:
        raise ConfigError(str(exc)) from exc
    print(
        json.dumps({"out": args.out, "summary": report["summary"], "policy_pass": (report["policy"] or {}).get("pass")})
    )
    if report["policy"] is not None and not report["policy"]["pass"]:
        failed = [r["metric"] for r in report["policy"]["results"] if not r["pass"]]
        print(f"deltaproxy: audit: policy failed: {', '.join(failed)}", file=sys.stderr)
        return 3
    return 0
