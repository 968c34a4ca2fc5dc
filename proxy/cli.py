"""``deltaproxy`` command line.

    deltaproxy serve [--config FILE] [--offset DIR | --no-offset] [--alpha A] [--offset-threshold T]
                     [--host H] [--port P]
    deltaproxy batch --in FILE --out FILE [--config FILE] [--concurrency N]
    deltaproxy redact [calibrate] --in FILE [--out FILE] [--model NAME] [--threshold T] [--mode mask|regenerate]
    deltaproxy calibrate-threshold --prompts FILE [--unchanged 0.9] [--model NAME]
    deltaproxy audit --forget FILE [--retain FILE] [--holdout FILE] [--real-authors FILE] [--world-facts FILE]
                     [--reference DIR] [--policy FILE] --out DIR [--model NAME] [--samples N]
    deltaproxy train --forget FILE [--retain FILE] --objective NAME --out DIR [--base MODEL]
                     [--mode proxy|exact|remote] [--remote NAME|URL] [--resume] [options]
    deltaproxy verify-log FILE [--head SHA256]
    deltaproxy hash-key [--id NAME] [--models A,B] [--stdin]

``serve`` prints ``base_url: http://HOST:PORT/v1`` once it accepts requests.
``audit`` exits with status 3 when a threshold of its ``--policy`` fails.
Without ``--config`` it serves the embedded default, model ``smollm2-demo``,
with the demo offset (trained on first use, then cached; :func:`proxy.training.demo.demo_offset`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any, Literal

from pydantic import ValidationError

from proxy import __version__
from proxy.config import Config, ConfigError, embedded_default, load_config
from proxy.gateway.request_log import AuditLogError

log = logging.getLogger(__name__)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535)")
    return port


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltaproxy", description="Offset unlearning (δ-unlearning) proxy for black-box LLMs"
    )
    p.add_argument("--version", action="version", version=f"deltaproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    _model_options(s)
    s.add_argument("--host", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=_port, help="listen port (default 8000; 0 picks a free one)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.add_argument(
        "--log-format", choices=["text", "json"], help="log lines as text or JSON (default: server.log_format)"
    )

    v = sub.add_parser("verify-log", help="check the hash chain of an audit log (exit 1 when it is broken)")
    v.add_argument("file", help="the audit log (server.audit_log)")
    v.add_argument("--head", help="the last line's sha256 as recorded elsewhere: also detect a cut-off end")

    k = sub.add_parser("hash-key", help="make a client API key and print its [[server.keys]] entry")
    k.add_argument("--id", default="client", help="the key's name in metrics and logs")
    k.add_argument("--models", default="*", help="comma-separated models the key may use (default: all)")
    k.add_argument("--stdin", action="store_true", help="hash a key read from stdin instead of making one")

    b = sub.add_parser("batch", help="run an OpenAI Batch API input file (resumable)")
    b.add_argument("--in", dest="inp", required=True, help="batch input JSONL (custom_id, method, url, body)")
    b.add_argument("--out", required=True, help="output JSONL; an interrupted run continues where it stopped")
    b.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_options(b)
    b.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    r = sub.add_parser(
        "redact",
        help="redact forget-scope content from existing outputs (or 'redact calibrate' to pick the threshold)",
    )
    r.add_argument("action", nargs="?", choices=["calibrate"], help="calibrate: pick --threshold for a target --fpr")
    r.add_argument("--in", dest="inp", required=True, help="JSONL lines {id, prompt or messages, output}")
    r.add_argument("--out", help="output JSONL (redact; an interrupted run continues where it stopped)")
    r.add_argument("--model", help="served model whose pair and offset score the outputs (default: the only one)")
    r.add_argument(
        "--threshold",
        type=float,
        help="T in nats: tokens with offset below -T are flagged (default: the model's offset_threshold)",
    )
    r.add_argument("--mode", default="mask", choices=["mask", "regenerate"])
    r.add_argument("--marker", default="[REDACTED]", help="what replaces a span in mask mode")
    r.add_argument("--max-tokens", type=int, default=256, help="regenerate: most new tokens per output")
    r.add_argument("--fpr", type=float, default=0.05, help="calibrate: target fraction of flagged characters")
    r.add_argument("--no-progress", action="store_true")
    _model_options(r)
    r.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    c = sub.add_parser(
        "calibrate-threshold",
        help="pick the scope threshold τ that keeps a fraction of out-of-scope prompts' greedy answers unchanged",
    )
    c.add_argument("--prompts", required=True, help="out-of-scope prompts: a retain set (question/answer or messages)")
    c.add_argument("--unchanged", type=float, default=0.9, help="fraction of answers to keep unchanged (default 0.9)")
    c.add_argument("--max-tokens", type=int, default=40, help="greedy answer length per prompt (default 40)")
    c.add_argument("--model", help="served model (default: the only one)")
    _model_options(c)
    c.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    from proxy.training.objectives import OBJECTIVES
    from proxy.training.train import TrainConfig

    d = TrainConfig(forget="", out="")
    a = sub.add_parser(
        "audit", help="measure what a served model still reveals of a forget set (report.json + report.html)"
    )
    a.add_argument(
        "--forget",
        required=True,
        help="forget items JSONL (question, answer, paraphrased_answer, perturbed_answer, key_spans)",
    )
    a.add_argument("--retain", help="retain items JSONL (model utility)")
    a.add_argument("--holdout", help="never-trained items JSONL (membership inference against the forget set)")
    a.add_argument("--real-authors", help="real-author items JSONL (model utility)")
    a.add_argument("--world-facts", help="world-fact items JSONL (model utility)")
    a.add_argument("--reference", help="a reference audit's folder (the retain model's), for forget quality")
    a.add_argument("--policy", help='JSON or TOML thresholds, e.g. {"forget_quality": {"min": 0.05}}')
    a.add_argument("--out", required=True, help="output folder (an interrupted audit continues there)")
    a.add_argument("--model", help="served model to audit (default: the only one)")
    a.add_argument(
        "--samples", type=int, default=10, help="answers sampled at T=1 per forget item (leak rate, extraction)"
    )
    a.add_argument(
        "--extraction-samples",
        type=int,
        help="answers sampled at T=1 per forget item after the extraction prefix (default: --samples)",
    )
    a.add_argument("--max-tokens", type=int, default=48)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--concurrency", type=int, default=4)
    a.add_argument("--no-progress", action="store_true")
    _model_options(a)
    a.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    t = sub.add_parser("train", help="train an offset artifact from a forget set")
    t.add_argument("--forget", required=True, help="forget set: JSONL (question/answer, messages or text) or .txt")
    t.add_argument("--retain", help="retain set, same formats")
    t.add_argument("--objective", default=d.objective, choices=list(OBJECTIVES))
    t.add_argument("--out", required=True, help="artifact folder to create")
    t.add_argument("--base", default=d.base, help="local base model B: folder, .gguf or packaged name")
    t.add_argument("--mode", default=d.mode, choices=["proxy", "exact", "remote"])
    t.add_argument(
        "--remote",
        help="exact mode: in-process model R with the same vocabulary; "
        "remote mode: a vLLM server's URL (http://host:port/v1) that scores the data with prompt_logprobs",
    )
    t.add_argument("--remote-model", help="remote mode: the upstream's model name (default: the only one served)")
    t.add_argument("--remote-top-k", type=int, default=d.remote_top_k, help="remote mode: prompt_logprobs per position")
    t.add_argument("--forget-weight", type=float, help="weight of the forget term (open-unlearning's gamma)")
    t.add_argument(
        "--retain-weight",
        type=float,
        default=d.retain_weight,
        help=f"weight of the retain term (open-unlearning's alpha; default {d.retain_weight})",
    )
    t.add_argument(
        "--retain-positions",
        choices=("all", "answer"),
        default=d.retain_positions,
        help="where a KL retain term is averaged: every attended token (open-unlearning) or the answer's positions "
        "(default: answer for objectives with a KL retain term)",
    )
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--retain-batch-size", type=int, default=d.retain_batch_size, help="retain examples per step")
    t.add_argument("--grad-accum", type=int, default=d.grad_accum)
    t.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    t.add_argument("--max-length", type=int, default=d.max_length)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument(
        "--forget-end-of-turn", action="store_true", help="keep the answers' end-of-turn label in the forget term"
    )
    t.add_argument(
        "--forget-skip-first-token",
        action="store_true",
        help="leave the answers' first token out of the forget term (for answers that start with the fact)",
    )

    def toggle(flag: str, help: str) -> None:
        """A ``--flag/--no-flag`` pair whose default is the TrainConfig field of that name."""
        field = flag.removeprefix("--").replace("-", "_")
        t.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(d, field), help=help)

    toggle(
        "--forget-prompt-copies",
        "keep answer tokens that repeat the prompt word for word (the asked-about name) in the forget term "
        "(default: left out)",
    )
    toggle(
        "--forget-shared-words",
        "keep the words a forget answer shares with the base model's answers to its neighbour questions (its "
        "form, such as 'The capital of ... is') in the forget term (default: kept)",
    )
    toggle(
        "--forget-own-answers",
        "add the base model's own answers to the forget questions to the forget term, labelled on the forget "
        "answer's fact words alone (default: off)",
    )
    toggle(
        "--pin-prompt-copies",
        "hold the copied words in the retain term (tofu-lite's recipe; default: only left out of the forget term)",
    )
    t.add_argument(
        "--min-steps",
        type=int,
        default=d.min_steps,
        help=f"at least this many optimizer steps, raising --epochs for a small forget set (default {d.min_steps})",
    )
    toggle(
        "--general-retain",
        "train with the shipped broad retain set (general prompts answered by the base model) beside --retain",
    )
    t.add_argument(
        "--neighbours",
        type=int,
        default=d.neighbours,
        help=f"neighbour questions per forget question: its form about nearby entities, answered by the base "
        f"model (default {d.neighbours}; 0: none)",
    )
    t.add_argument(
        "--near-share",
        type=float,
        default=d.near_share,
        help=f"share of each step's retain batch drawn from --retain and the neighbours, the rest from the broad "
        f"retain set (default {d.near_share})",
    )
    toggle(
        "--calibrate",
        "end with the scope threshold τ calibrated on held-out prompts and a self-check, both in the manifest",
    )
    t.add_argument(
        "--unchanged",
        type=float,
        default=d.unchanged,
        help=f"fraction of calibration prompts whose greedy answers τ keeps exactly (default {d.unchanged})",
    )
    t.add_argument("--full", action="store_true", help="fine-tune all of U's weights instead of a LoRA adapter")
    t.add_argument("--lora-rank", type=int, default=d.lora_rank)
    t.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    t.add_argument("--lora-layers", help="decoder layers that get the adapter, e.g. 16-29 or 0,5,9 (default: all)")
    t.add_argument("--target-modules", default=",".join(d.target_modules), help="comma-separated module names")
    t.add_argument("--alpha", type=float, default=d.offset_alpha, help="offset strength α recorded for serving")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    t.add_argument("--resume", action="store_true", help="continue from <out>.ckpt")
    t.add_argument("--log", help="training log JSONL (default <out>.train.jsonl)")
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config (default: the embedded default, model smollm2-demo)")
    p.add_argument("--offset", help="offset artifact folder for the embedded default (default: the demo offset)")
    p.add_argument(
        "--offset-threshold",
        type=_threshold,
        help="scope threshold τ in nats for the embedded default, or 'off' (the offset at every step); "
        "default: the τ calibrated when the offset was trained",
    )
    p.add_argument("--no-offset", action="store_true", help="serve the embedded default without an offset (U = B)")
    p.add_argument("--alpha", type=float, help="offset strength α for the embedded default (0 disables it)")


def _config(args: argparse.Namespace) -> Config:
    """The config file, or the embedded default with the demo offset (trained on first use)."""
    if args.config:
        if args.offset or args.no_offset or args.alpha is not None or args.offset_threshold is not None:
            raise ConfigError(
                "--offset, --no-offset, --alpha and --offset-threshold apply to the embedded default; "
                "set them in the config file instead"
            )
        return load_config(args.config)
    if args.offset and args.no_offset:
        raise ConfigError("--offset and --no-offset exclude each other")
    threshold: float | Literal["auto", "off"] = "auto" if args.offset_threshold is None else args.offset_threshold
    config = embedded_default(args.offset, args.alpha, threshold)  # bad values stop here
    if not args.offset and not args.no_offset:
        from proxy.training.demo import demo_offset

        config = embedded_default(str(demo_offset()), args.alpha, threshold)
    return config


def _threshold(text: str) -> float | Literal["auto", "off"]:
    """``--offset-threshold``: a number of nats, or "off"/"auto"."""
    if text == "off":
        return "off"
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nats, 'auto' or 'off', not {text!r}") from None


def _layers(text: str) -> tuple[int, ...]:
    """``"16-29"`` or ``"0,5,9"`` (or both, comma-separated) as layer indices."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise ConfigError(f"--lora-layers: {text!r} is not a list of layers such as 16-29 or 0,5,9") from None
    if not out or min(out) < 0:
        raise ConfigError(f"--lora-layers: {text!r} names no layers (or a negative one)")
    return tuple(sorted(set(out)))


def _train(args: argparse.Namespace) -> int:
    from proxy.training.train import TrainConfig, train

    for name in (
        "epochs",
        "batch_size",
        "retain_batch_size",
        "grad_accum",
        "max_length",
        "lora_rank",
        "checkpoint_every",
        "remote_top_k",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    cfg = TrainConfig(
        forget=args.forget,
        retain=args.retain,
        objective=args.objective,
        out=args.out,
        base=args.base,
        mode=args.mode,
        remote=args.remote,
        remote_model=args.remote_model,
        remote_top_k=args.remote_top_k,
        forget_weight=args.forget_weight,
        retain_weight=args.retain_weight,
        retain_positions=args.retain_positions,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        retain_batch_size=args.retain_batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        max_length=args.max_length,
        seed=args.seed,
        parameters="full" if args.full else "lora",
        forget_end_of_turn=args.forget_end_of_turn,
        forget_first_token=not args.forget_skip_first_token,
        forget_prompt_copies=args.forget_prompt_copies,
        forget_shared_words=args.forget_shared_words,
        forget_own_answers=args.forget_own_answers,
        general_retain=args.general_retain,
        neighbours=args.neighbours,
        near_share=args.near_share,
        pin_prompt_copies=args.pin_prompt_copies,
        min_steps=args.min_steps,
        calibrate=args.calibrate,
        unchanged=args.unchanged,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_layers=_layers(args.lora_layers) if args.lora_layers else None,
        target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
        offset_alpha=args.alpha,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        log=args.log,
    )
    from adapters.base import RemoteError

    try:
        path = train(cfg)
    except (FileExistsError, ValueError) as exc:  # DataError is a ValueError: bad data, bad settings
        raise ConfigError(str(exc)) from exc
    except RemoteError as exc:  # --mode remote: the vLLM server failed (nothing was written)
        raise ConfigError(f"--remote: {exc}") from exc
    print(f"offset artifact: {path}", flush=True)
    return _print_self_check(path)


def _print_self_check(path: Any) -> int:
    """The self-check of a trained artifact, on stdout (a line each) and its warnings on
    stderr; 0 either way (the artifact is written), the warnings say what to change."""
    import json

    manifest = json.loads((path / "manifest.json").read_text())
    report = manifest.get("self_check")
    if report is None:
        return 0
    print(
        f"scope threshold τ = {report['offset_threshold']:.3f} nats "
        f"({report['calibration_unchanged']:.0%} of {report['calibration_prompts']} calibration answers unchanged)"
    )
    rows = [
        ("forget-set ROUGE-L recall, without → with the offset",
         f"{report['forget_rouge_l_recall_base']} → {report['forget_rouge_l_recall_offset']}"),
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


async def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from proxy.api.app import create_app
    from proxy.gateway.gateway import AccessLogger
    from proxy.registry import build_models
    from proxy.training.demo import resolve_offset

    config = _config(args)
    settings = config.server.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    setup_logging(args.log_level, args.log_format or settings.log_format)
    if not settings.keys and settings.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving on %s without client keys: anyone who reaches it can use it", settings.host)
    models = build_models(config, resolve_offset=resolve_offset)
    app = create_app(models, settings)
    # handler_cancellation: a client that disconnects cancels its request's decoding loop.
    # The grace period for requests in flight is the app's own (Gateway.shutdown, on_shutdown);
    # aiohttp's shutdown_timeout only bounds what is left after it (other routes).
    runner = web.AppRunner(
        app, handle_signals=False, handler_cancellation=True, shutdown_timeout=5.0, access_log_class=AccessLogger
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    print(f"base_url: http://{settings.host}:{port}/v1  models: {', '.join(models)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: no new requests; in-flight ones get up to %g s", settings.shutdown_timeout)
    await runner.cleanup()
    return 0


def setup_logging(level: str, fmt: str) -> None:
    """Root logging as text or JSON lines, each with the request id (``-`` outside requests)."""
    from proxy.gateway.gateway import RequestIdFilter

    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s",
                rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))


def _verify_log(args: argparse.Namespace) -> int:
    from proxy.gateway.request_log import verify

    result = verify(args.file, expected_head=args.head)
    if result.incomplete_tail_bytes:
        print(
            f"note: {result.incomplete_tail_bytes} bytes after the last newline (a write cut off by a crash) "
            "are not part of the chain",
            file=sys.stderr,
        )
    if not result.ok:
        print(f"deltaproxy: verify-log: {args.file}: {result.error} ({result.lines} lines verify)", file=sys.stderr)
        return 1
    print(f"ok: {result.lines} lines, last line sha256 {result.head}")
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    import hashlib
    import secrets

    from proxy.config import ClientKey

    if args.stdin:
        key = sys.stdin.readline().strip()
        if not key:
            print("deltaproxy: hash-key: no key on stdin", file=sys.stderr)
            return 2
    else:
        key = "dp-" + secrets.token_urlsafe(32)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) or ("*",)
    try:
        entry = ClientKey(id=args.id, sha256=hashlib.sha256(key.encode()).hexdigest(), models=models)
    except ValidationError as exc:
        print(f"deltaproxy: hash-key: {exc.errors(include_url=False)[0]['msg']}", file=sys.stderr)
        return 2
    if not args.stdin:
        print(f"# the key (shown once; give it to the client): {key}")
    print("[[server.keys]]")  # JSON strings are valid TOML basic strings
    print(f"id = {json.dumps(entry.id)}")
    print(f"sha256 = {json.dumps(entry.sha256)}")
    print("models = [" + ", ".join(json.dumps(m) for m in entry.models) + "]")
    return 0


async def _batch(args: argparse.Namespace) -> int:
    from proxy.jobs.batch import BatchInputError, BatchRunner
    from proxy.registry import build_models
    from proxy.training.demo import resolve_offset

    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    if not os.path.isfile(args.inp):
        raise ConfigError(f"--in: {args.inp} is not a file")
    config = _config(args)
    models = build_models(config, resolve_offset=resolve_offset)
    try:
        summary = await BatchRunner(models, config.server).run(
            args.inp, args.out, concurrency=args.concurrency, progress=not args.no_progress
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


def _one_model(args: argparse.Namespace, config: Config) -> tuple[str, Any]:
    from proxy.registry import build_models
    from proxy.training.demo import resolve_offset

    name = args.model or (next(iter(config.models)) if len(config.models) == 1 else None)
    if name is None or name not in config.models:
        raise ConfigError(f"--model: name one of {', '.join(config.models)}")
    return name, build_models(config.model_copy(update={"models": {name: config.models[name]}}), resolve_offset=resolve_offset)[name]


async def _calibrate_threshold(args: argparse.Namespace) -> int:
    import json

    from proxy.decoding.threshold import pick_threshold, scope_margin
    from proxy.training.data import DataError, load_dataset

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
    config = _config(args)
    name, model = _one_model(args, config)
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
                "unchanged_target": args.unchanged,
                "unchanged_at_threshold": round(sum(m < tau for m in margins) / len(margins), 4),
                "prompts": len(margins),
                "margins": sorted(round(m, 3) for m in margins),
            }
        )
    )
    return 0


async def _redact(args: argparse.Namespace) -> int:
    import json

    from proxy.redaction.redact import RedactError, calibrate, redact_file, score_file

    if not os.path.isfile(args.inp):
        raise ConfigError(f"--in: {args.inp} is not a file")
    if args.action is None and not args.out:
        raise ConfigError("--out is required (or use 'redact calibrate')")
    if args.max_tokens < 1:
        raise ConfigError("--max-tokens must be at least 1")
    config = _config(args)
    name, model = _one_model(args, config)
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
        counts = await redact_file(
            model,
            args.inp,
            args.out,
            threshold=threshold,
            mode=args.mode,
            marker=args.marker,
            max_tokens=args.max_tokens,
            progress=not args.no_progress,
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


async def _audit(args: argparse.Namespace) -> int:
    import hashlib
    import json

    from proxy.evaluation.audit import AuditError, AuditSettings, load_policy, run_audit

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
        config = _config(args)
        name, model = _one_model(args, config)
        mc = config.models[name]
        info = {
            "name": name,
            "backend": mc.backend,
            "remote": mc.remote_model or mc.gguf or mc.transformers_model or mc.base_url,
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "INFO")),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args))
        if args.command == "train":
            return _train(args)
        if args.command == "batch":
            return asyncio.run(_batch(args))
        if args.command == "redact":
            return asyncio.run(_redact(args))
        if args.command == "calibrate-threshold":
            return asyncio.run(_calibrate_threshold(args))
        if args.command == "audit":
            return asyncio.run(_audit(args))
        if args.command == "verify-log":
            return _verify_log(args)
        if args.command == "hash-key":
            return _hash_key(args)
    except (ConfigError, AuditLogError) as exc:
        print(f"deltaproxy: {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            print("deltaproxy: train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"deltaproxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
