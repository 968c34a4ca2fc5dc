"""The ``deltaproxy`` argument parser: every command's options, and nothing heavier than
argparse, so that ``--help`` and the small commands start without torch. ``train``'s options
are generated from :class:`proxy.training.config.TrainConfig`'s fields (type, default,
choices, help from the field's docstring), so a new training setting is a new flag."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import types
import typing
from typing import Any, Literal

from proxy import __version__
from proxy.training.config import TrainConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def port(text: str) -> int:
    """``--port``: 0 to 65535 (0 picks a free port)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 to 65535)")
    return value


def threshold(text: str) -> float | Literal["auto", "off"]:
    """``--offset-threshold``: a number of nats, or "off"/"auto"."""
    if text in ("off", "auto"):
        return typing.cast(Literal["auto", "off"], text)
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nats, 'auto' or 'off', not {text!r}") from None


def layers(text: str) -> tuple[int, ...]:
    """``--lora-layers``: ``"16-29"`` or ``"0,5,9"`` (or both, comma-separated) as layer indices."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of layers such as 16-29 or 0,5,9") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} names no layers (or a negative one)")
    return tuple(sorted(set(out)))


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


def model_options(p: argparse.ArgumentParser) -> None:
    """``--config`` and the embedded default's settings."""
    p.add_argument("--config", help="TOML config (default: the embedded default, model smollm2-demo)")
    p.add_argument("--offset", help="offset artifact folder for the embedded default (default: the demo offset)")
    p.add_argument(
        "--offset-threshold",
        type=threshold,
        help="scope threshold τ in nats for the embedded default, or 'off' (the offset at every step); "
        "default: the τ calibrated when the offset was trained",
    )
    p.add_argument("--no-offset", action="store_true", help="serve the embedded default without an offset (U = B)")
    p.add_argument("--alpha", type=float, help="offset strength α for the embedded default (0 disables it)")


def engine_options(p: argparse.ArgumentParser) -> None:
    """``--engine`` and the Ray engine's settings."""
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: Ray Data workers, each with its own model (default local)",
    )
    p.add_argument(
        "--ray-address",
        help="a running Ray cluster (default: $RAY_ADDRESS, else a local cluster started for this run)",
    )
    p.add_argument("--workers", type=int, default=2, help="--engine ray: workers, one model each (default 2)")
    p.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="--engine ray: CPUs reserved per worker (default 1)"
    )


def build() -> argparse.ArgumentParser:
    """The whole parser; each command sets ``command`` (its module under :mod:`proxy.cli`)."""
    p = argparse.ArgumentParser(
        prog="deltaproxy", description="Offset unlearning (δ-unlearning) proxy for black-box LLMs"
    )
    p.add_argument("--version", action="version", version=f"deltaproxy {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, help="default: INFO for serve, WARNING otherwise")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help)

    s = command("serve", "serve the OpenAI-compatible API")
    model_options(s)
    s.add_argument("--host", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=port, help="listen port (default 8000; 0 picks a free one)")
    s.add_argument(
        "--log-format", choices=["text", "json"], help="log lines as text or JSON (default: server.log_format)"
    )

    v = command("verify-log", "check the hash chain of an audit log, or of each replica's (exit 1 when one is broken)")
    v.add_argument("file", nargs="+", help="the audit log (server.audit_log), or each replica's")
    v.add_argument(
        "--head", help="the last line's sha256 as recorded elsewhere: also detect a cut-off end (one file only)"
    )

    k = command("hash-key", "make a client API key and print its [[server.keys]] entry")
    k.add_argument("--id", default="client", help="the key's name in metrics and logs")
    k.add_argument("--models", default="*", help="comma-separated models the key may use (default: all)")
    k.add_argument("--stdin", action="store_true", help="hash a key read from stdin instead of making one")

    b = command("batch", "run an OpenAI Batch API input file (resumable)")
    b.add_argument("--in", dest="inp", required=True, help="batch input JSONL (custom_id, method, url, body)")
    b.add_argument("--out", required=True, help="output JSONL; an interrupted run continues where it stopped")
    b.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    engine_options(b)
    model_options(b)

    r = command(
        "redact", "redact forget-scope content from existing outputs (or 'redact calibrate' to pick the threshold)"
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
    engine_options(r)
    model_options(r)

    c = command(
        "calibrate-threshold",
        "pick the scope threshold τ that keeps a fraction of out-of-scope prompts' greedy answers unchanged",
    )
    c.add_argument("--prompts", required=True, help="out-of-scope prompts: a retain set (question/answer or messages)")
    c.add_argument("--unchanged", type=float, default=0.9, help="fraction of answers to keep unchanged (default 0.9)")
    c.add_argument("--max-tokens", type=int, default=40, help="greedy answer length per prompt (default 40)")
    c.add_argument("--model", help="served model (default: the only one)")
    model_options(c)

    a = command("audit", "measure what a served model still reveals of a forget set (report.json + report.html)")
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
    a.add_argument("--policy", help='a JSON or TOML file of thresholds, such as {"forget_quality": {"min": 0.05}}')
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
    a.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="items evaluated at once; sampled answers are drawn the square of it at a time (default 4: 16)",
    )
    a.add_argument("--no-progress", action="store_true")
    engine_options(a)
    model_options(a)

    train_options(command("train", "train an offset artifact from a forget set"))
    return p


# ----------------------------------------------------------------------------- train

#: Flags whose name is not the field's (``--alpha`` is the offset strength recorded for serving).
FLAG = {"offset_alpha": "--alpha"}
#: Help where the field's docstring is not written for the command line.
HELP = {
    "forget": "forget set: JSONL (question/answer, messages or text) or .txt",
    "objective": "unlearning objective (open-unlearning's definitions)",
    "mode": "where the training target comes from: the pair alone (proxy), an in-process model R with "
    "B's vocabulary (exact), or a vLLM server's prompt_logprobs (remote)",
    "retain": "retain set, same formats",
    "out": "artifact folder to create",
    "base": "local base model B: folder, .gguf or packaged name",
    "remote": "exact mode: in-process model R with the same vocabulary; remote mode: a vLLM server's URL "
    "(http://host:port/v1) that scores the data with prompt_logprobs",
    "forget_weight": "weight of the forget term (open-unlearning's gamma; default: the objective's, 1, or 0.125 "
    "for SimNPO)",
    "retain_weight": "weight of the retain term (open-unlearning's alpha)",
    "retain_positions": "where a KL retain term is averaged: every attended position (open-unlearning) or the "
    "answer's (default: answer for objectives with a KL retain term, else all)",
    "lr": "learning rate",
    "epochs": "passes over the forget set",
    "batch_size": "forget examples per optimizer step",
    "retain_batch_size": "retain examples per optimizer step",
    "grad_accum": "batches accumulated per optimizer step",
    "warmup_steps": "linear warm-up steps of the learning rate",
    "max_length": "most tokens per example, prompt and answer",
    "seed": "seed of the batches and of LoRA's initialisation",
    "parameters": "lora: a LoRA adapter on B; full: all of U's weights (B a frozen copy)",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (the update is scaled by alpha / rank)",
    "checkpoint_every": "optimizer steps between checkpoints (for --resume)",
    "forget_shared_words": "keep the words a forget answer shares with B's answers to its neighbour questions "
    "(its form, such as 'The capital of ... is') in the forget term",
    "forget_own_answers": "add B's own answers to the forget questions to the forget term, labelled on the "
    "words that carry each fact",
    "forget_own_samples": "B's answers sampled at T = 1 per forget question that join the forget term beside its "
    "greedy one where they state a fact word; 0: the greedy answer alone",
    "forget_cross_answers": "per forget example and epoch, other forget examples' answers asked its question "
    "that join the forget term, labelled on the forget set's fact words; 0: none",
    "retain_fact_weight": "weight of a retain answer's fact words (names, rare words) in the KL retain term "
    "over answer positions; 1: unweighted",
    "offset_scope": "the rule τ is calibrated for: choice (token, but a step whose most likely candidate has "
    "an offset at most −τ takes its whole offset), token (a candidate keeps its offset only where it is at "
    "most −τ) or step (a step keeps its offsets only where their mean is)",
    "scope_gate": "fit the scope gate after training: a classifier over B's next-token log-probabilities that "
    "opens the offset on the forget set's context and closes it elsewhere",
    "scope_gate_threshold": "the gate's probability threshold θ (open at or above it)",
    "tau_through_gate": "calibrate τ on answers decoded through the scope gate, as serve decodes (off: τ alone "
    "keeps the calibration answers)",
    "scope_gate_l2": "L2 penalty of the gate's logistic regression",
    "lora_layers": "decoder layers that get the adapter, e.g. 16-29 or 0,5,9 (default: all)",
    "target_modules": "comma-separated module names",
    "resume": "continue from <out>.ckpt",
    "log": "training log JSONL (default <out>.train.jsonl)",
    "offset_alpha": "offset strength α recorded for serving",
}
#: Settings that must be at least 1.
POSITIVE = (
    "epochs",
    "batch_size",
    "retain_batch_size",
    "grad_accum",
    "max_length",
    "lora_rank",
    "checkpoint_every",
    "remote_top_k",
)


@functools.cache
def field_docs() -> dict[str, str]:
    """Each TrainConfig field's docstring (the string literal after it in the class body)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)).body
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _first_sentence(text: str) -> str:
    """A docstring's first sentence as plain help text: cross-references dropped, markup removed."""
    head = text.split(". ")[0].rstrip(".")
    head = re.sub(r"\s*\(:(?:func|class|meth|mod|data|attr):`[^`]*`\)", "", head)
    head = re.sub(r":(?:func|class|meth|mod|data|attr):`~?([^`]*)`", r"\1", head).replace("``", "")
    return head.replace("%", "%%")


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def train_options(t: argparse.ArgumentParser) -> None:
    """One option per :class:`TrainConfig` field: ``--field-name`` (``FLAG`` renames), typed by
    the field (bool: ``--x/--no-x``; a ``Literal``: its choices; tuples: comma-separated),
    defaulting to the field's default."""
    hints = typing.get_type_hints(TrainConfig)
    docs = field_docs()
    for f in dataclasses.fields(TrainConfig):
        flag = FLAG.get(f.name, "--" + f.name.replace("_", "-"))
        kind = hints[f.name]
        args = typing.get_args(kind)
        optional = type(None) in args
        if optional or isinstance(kind, types.UnionType):
            kind = next(a for a in args if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else None
        help = HELP.get(f.name) or _first_sentence(docs.get(f.name, ""))
        opts: dict[str, Any] = {"dest": f.name, "help": help or None}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            opts["required"] = True
        else:
            opts["default"] = default
            if default is not None and kind is not bool:
                shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
                opts["help"] = f"{help} (default {shown})" if help else f"default {shown}"
        if kind is bool:
            opts["action"] = argparse.BooleanOptionalAction
            opts["help"] = f"{help} (default: {'on' if default else 'off'})" if help else None
        elif typing.get_origin(kind) is Literal:
            opts["choices"] = typing.get_args(kind)
        elif kind == tuple[int, ...]:
            opts["type"] = layers
        elif kind == tuple[str, ...]:
            opts["type"] = names
        elif f.name in POSITIVE:
            opts["type"] = _at_least_one
        elif kind in (int, float, str):
            opts["type"] = kind
        else:  # a new field of a type this cannot read: fail here, not at a user's call
            raise TypeError(f"TrainConfig.{f.name}: no command-line type for {kind!r}")
        t.add_argument(flag, **opts)
    # Shorthands.
    t.add_argument("--full", dest="parameters", action="store_const", const="full", help="same as --parameters full")
    t.add_argument(
        "--forget-skip-first-token",
        dest="forget_first_token",
        action="store_false",
        help="same as --no-forget-first-token",
    )
