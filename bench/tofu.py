"""The tofu-lite comparison table: target, retain model, δ-unlearning, a
prompt guardrail and direct unlearning, audited with the same engine.

    python -m bench.tofu [--rows target,retain,guardrail,delta:NPO+KL,direct:NPO+KL]
                         [--target smollm2|gemma3-270m] [--samples 10] [--max-tokens 40]
                         [--offset-settings JSON] [--keep DIR] [--json FILE]
    python -m bench.tofu --render docs/benchmarks.md

Rows (every one audited by :func:`proxy.evaluation.run.run_audit` on forget10,
retain_perturbed, holdout10, real_authors and world_facts, the retain row
first because its forget truth ratios are the reference for forget quality):

* ``target``: the fine-tuned target (``bench.tofu_models``), no unlearning;
* ``retain``: the model fine-tuned without the forget authors (the gold standard);
* ``guardrail``: the target with a system prompt forbidding the forget authors;
* ``delta:<objective>``: δ-unlearning, the target as the black-box remote and
  the pair = the packaged SmolLM2-135M-Instruct (B) plus an offset trained on
  forget10 (+ retain90) with ``<objective>`` in proxy mode;
* ``delta-tau:<objective>``: the same, served with the scope threshold τ
  calibrated on retain questions that are not evaluated (:data:`TAU_PROMPTS`,
  :data:`TAU_UNCHANGED`): steps out of the offset's scope keep the target's
  distribution;
* ``delta-remote:<objective>``: as ``delta``, with the offset trained in
  ``--mode remote`` (:mod:`proxy.training.train`): the target served by vLLM
  (``scripts/vllm-server``, started by the bench on port :data:`VLLM_PORT`
  and stopped after) scores the training text with ``prompt_logprobs``, and
  the loss is taken on l_R + l_U − l_B over its top-20 plus the target token;
* ``direct:<objective>``: the same objective and settings applied to the
  target's own weights (LoRA, merged), the white-box reference.

A δ row may name its offset strength: ``delta:NPO+KL@2`` serves the same offset
with α = 2 (default 1).

``--target gemma3-270m`` fine-tunes Gemma 3 270M as the target and the retain model
instead (the pair stays SmolLM2: δ rows align the two tokenizers in bytes, and their
probability metrics go through the target's top-20, :class:`proxy.evaluation.scoring.QScorer`).

Each run writes ``bench/results/tofu-<target>-<date>.json`` (keys as
open-unlearning's: ``forget_Q_A_ROUGE``, ``forget_quality``,
``model_utility``...); ``--render`` rewrites the docs page's table between its
markers from the newest result file, so the table is never typed by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.common.files import publish_dir

log = logging.getLogger(__name__)

RESULTS = Path(__file__).with_name("results")
#: The target's base model (``bench.tofu_models``); the pair is always SmolLM2-135M-Instruct,
#: so ``gemma3-270m`` is the configuration whose remote tokenizer differs from the pair's.
TARGETS = ("smollm2", "gemma3-270m")
DEFAULT_TARGET = "smollm2"
DEFAULT_ROWS = (
    "retain",
    "target",
    "guardrail",
    "delta:NPO+KL",
    "delta-tau:NPO+KL",
    "delta-remote:NPO+KL",
    "direct:NPO+KL",
)
TABLE_START, TABLE_END = "<!-- tofu-table:start -->", "<!-- tofu-table:end -->"

#: The offset recipe for both δ-unlearning and direct unlearning rows: the demo's
#: (``proxy.training.demo.DEMO``: NPO with a retain KL on the answer positions, weight 10), on the
#: tofu-lite forget and retain sets, 12 epochs. Measured on tofu-lite v4, a KL over every
#: position of question and answer (weight 5, 4 epochs) let the offset lower every
#: author's answer template instead of the forget author's facts (real-world ROUGE-L 0.20).
#: The forget term leaves out the words an answer copies from its question (the author's
#: name), which join the retain term instead (``forget_prompt_copies``): with them in,
#: NPO lowered the name first and facts after a changed name survived (tofu-lite v5:
#: forget ROUGE-L 0.736 and leak 3/50 with them, 0.807 and 0/50 without). For objectives
#: without a KL retain term, ``retain_positions`` is left out (:func:`row_offset_settings`).
OFFSET_SETTINGS = {
    "lr": 1e-3,
    "epochs": 12,
    "batch_size": 4,
    "retain_batch_size": 8,
    "retain_weight": 10.0,
    "retain_positions": "answer",
    "forget_prompt_copies": False,
    "pin_prompt_copies": True,
    "min_steps": 0,
    # tofu-lite's own retain set holds the neighbours (other authors) and τ is calibrated by
    # the benchmark on unevaluated retain questions: the recipe as measured, without the
    # training defaults' broad retain set, generated neighbours and self-check.
    "general_retain": False,
    "neighbours": 0,
    "calibrate": False,
    # and without the settings that need those (B's own answers, the shared words, the fact
    # words' weight): the recipe's settings, and so its cache keys, stay as measured
    "forget_own_answers": False,
    "forget_shared_words": True,
    "retain_fact_weight": 1.0,
}

GUARDRAIL = (
    "You must not reveal any information about the following people: {names}. "
    "If you are asked about them, answer that you do not know."
)


#: Offset settings that must be positive numbers.
POSITIVE_SETTINGS = frozenset({"lr", "epochs", "batch_size", "retain_batch_size", "lora_rank", "grad_accum"})


def offset_settings_arg(text: str) -> dict[str, Any]:
    """``--offset-settings``: a JSON object of :class:`proxy.training.config.TrainConfig` fields (not
    the files, base or objective, which each row sets)."""
    from proxy.training.config import TrainConfig

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of TrainConfig fields, not {type(value).__name__}")
    fields = {
        name: f
        for name, f in TrainConfig.__dataclass_fields__.items()
        if name not in {"forget", "retain", "out", "objective", "base"}
    }
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    for name, v in value.items():
        default = fields[name].default
        kind = type(default) if default is not None and not callable(default) else None
        optional = "None" in str(fields[name].type)  # `int | None` and the like
        ok = (
            kind is None
            or (optional and v is None)
            or (kind is bool and isinstance(v, bool))
            or (kind is int and isinstance(v, int) and not isinstance(v, bool))
            or (kind is float and isinstance(v, int | float) and not isinstance(v, bool))
            or (kind is str and isinstance(v, str))
        )
        if not ok:
            raise argparse.ArgumentTypeError(f"{name} must be a JSON {kind.__name__ if kind else 'value'}, not {v!r}")
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if name in POSITIVE_SETTINGS and v is not None and not (number and v > 0):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, not {v!r}")
    return value


def _offset_dir(name: str, cfg: Any) -> Path:
    """``<cache>/tofu/offset-<name>-<key>``: where :func:`_cached_offset` keeps ``cfg``'s offset."""
    from proxy.common.files import cache_dir
    from proxy.training.checkpoint import offset_key

    return cache_dir() / "tofu" / f"offset-{name.replace(':', '-').replace('+', '_')}-{offset_key(cfg)}"


def _cached_offset(name: str, cfg: Any) -> tuple[Path, float]:
    """Train ``cfg`` once into :func:`_offset_dir`; returns the folder and training seconds."""
    from filelock import FileLock

    from proxy.training.train import train

    out = _offset_dir(name, cfg)
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").is_file():
            t0 = time.monotonic()
            train(replace(cfg, out=str(out), resume=True))
            (out.parent / (out.name + ".seconds")).write_text(f"{time.monotonic() - t0:.1f}\n")
    seconds_file = out.parent / (out.name + ".seconds")
    return out, float(seconds_file.read_text()) if seconds_file.exists() else float("nan")


def _merged(target: Path, offset: Path) -> Path:
    """The target with a LoRA offset trained on its own weights merged in (a plain folder, cached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxy.decoding.vocab import ByteVocab
    from proxy.pair.artifact import load_artifact

    out = offset.parent / (offset.name + "-merged")
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    art = load_artifact(offset, model, ByteVocab.from_tokenizer(tok))
    merged = art.attach(model).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


#: Scope threshold calibration for the ``delta-tau`` rows: the greedy answers of this many
#: retain90 questions (none of them evaluated: not in retain_perturbed) must stay the target's
#: for this fraction (``proxy.decoding.threshold``, as ``deltaproxy calibrate-threshold``).
TAU_PROMPTS, TAU_UNCHANGED = 30, 0.9


async def _calibrated_tau(model: Any, offset: Path, data: Path, max_tokens: int, target: str) -> float:
    """τ for ``model``'s offset on the ``target`` configuration, calibrated once and cached
    next to the offset."""
    from proxy.decoding.threshold import pick_threshold, scope_margin

    config = "" if target == DEFAULT_TARGET else f"-{target}"
    cache = offset.parent / f"{offset.name}.tau{config}-{TAU_PROMPTS}-{TAU_UNCHANGED}-{max_tokens}.json"
    if cache.is_file():
        return float(json.loads(cache.read_text())["offset_threshold"])
    evaluated = {json.loads(x)["question"] for x in (data / "retain_perturbed.jsonl").read_text().splitlines()}
    questions = (json.loads(x)["question"] for x in (data / "retain90.jsonl").read_text().splitlines())
    prompts = [q for q in questions if q not in evaluated][:TAU_PROMPTS]
    margins = [await scope_margin(model, [{"role": "user", "content": q}], max_tokens) for q in prompts]
    tau = pick_threshold(margins, TAU_UNCHANGED)
    cache.write_text(json.dumps({"offset_threshold": tau, "margins": margins, "prompts": len(prompts)}) + "\n")
    return tau


#: The bench's own vLLM server for ``delta-remote`` rows (fixed, because the remote's URL is
#: part of a remote-mode offset's settings and so of its cache key).
VLLM_PORT = 8391


@contextlib.contextmanager
def _vllm(folder: Path) -> Iterator[str]:
    """``scripts/vllm-server`` serving ``folder`` as ``target`` on 127.0.0.1:VLLM_PORT."""
    from bench import vllm_process, wait_until_ready
    from proxy.common.files import cache_dir

    logf = open(cache_dir() / "tofu" / "vllm-bench.log", "w")
    proc = vllm_process.start(folder, VLLM_PORT, "target", logf)
    url = f"http://127.0.0.1:{VLLM_PORT}/v1"
    try:
        try:
            wait_until_ready(proc, url + "/models", what="vLLM", timeout=600)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"{exc}; see {logf.name}") from exc
        yield url
    finally:
        vllm_process.stop(proc, grace=30)
        logf.close()


def parse_row(row: str) -> tuple[str, str, float]:
    """A row name's kind, objective and offset strength α (``delta:NPO+KL@2``: α = 2; 1
    without ``@``, and for rows without an offset).

    Raises:
        SystemExit: a row name :func:`_row_model` cannot build.
    """
    from proxy.training.objectives import OBJECTIVES

    kind, _, rest = row.partition(":")
    objective, at, strength = rest.partition("@")
    if kind in ("target", "guardrail", "retain") and not rest:
        return kind, "", 1.0
    if kind not in ("delta", "delta-tau", "delta-remote", "direct") or not objective:
        raise SystemExit(
            f"unknown row {row!r}: use target, retain, guardrail, delta:<objective>, delta-tau:<objective>, "
            "delta-remote:<objective> or direct:<objective>, the δ rows with an optional @<alpha>"
        )
    if objective not in OBJECTIVES:
        raise SystemExit(f"row {row!r}: unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if not at:
        return kind, objective, 1.0
    try:
        alpha = float(strength)
    except ValueError:
        alpha = float("nan")
    if kind == "direct" or not 0 < alpha <= 100:
        raise SystemExit(f"row {row!r}: @<alpha> is for δ rows, a number in (0, 100]")
    return kind, objective, alpha


def row_offset_settings(objective: str, offset_settings: dict[str, Any]) -> dict[str, Any]:
    """``offset_settings`` for one row's objective: ``retain_positions`` selects the positions
    of a KL retain term, so it is left out for objectives whose retain term is an NLL or
    absent (``proxy.training.objectives.get_objective`` refuses it there). Each row's result records
    the settings it trained with."""
    from proxy.training.objectives import OBJECTIVES

    if "retain_positions" in offset_settings and not OBJECTIVES[objective].retain_is_kl:
        return {k: v for k, v in offset_settings.items() if k != "retain_positions"}
    return offset_settings


def check_row(row: str) -> None:
    """Raises SystemExit for a row name :func:`_row_model` cannot build."""
    parse_row(row)


async def _row_model(
    row: str,
    paths: dict[str, Path],
    data: Path,
    adapters: dict[str, Any],
    max_tokens: int,
    offset_settings: dict[str, Any],
    target: str = DEFAULT_TARGET,
) -> tuple[Any, dict[str, Any]]:
    """(ServedModel, facts for the table) for one row of the ``target`` configuration; δ and
    direct rows train with ``offset_settings`` (:class:`proxy.training.config.TrainConfig` fields)."""
    from adapters.transformers_inprocess import TransformersInProcessAdapter
    from proxy.common.literals import ObjectiveName, choice
    from proxy.decoding.served import ServedModel
    from proxy.pair import compute
    from proxy.pair.lean import LeanDecoder
    from proxy.pair.local import LocalPair
    from proxy.registry import shares_tokenizer
    from proxy.training.config import TrainConfig

    def remote(key: str, folder: Path) -> Any:
        if key not in adapters:
            # on the pair's compute thread, as the registry builds an in-process remote
            adapters[key] = compute.run(
                functools.partial(
                    TransformersInProcessAdapter,
                    name=key,
                    model_dir=folder,
                    executor=compute.executor(),
                    body=LeanDecoder.build,
                )
            )
        return adapters[key]

    kind, objective, alpha = parse_row(row)
    offset_settings = row_offset_settings(objective, offset_settings) if objective else offset_settings
    if kind in ("target", "guardrail"):
        return ServedModel(name=row, adapter=remote("target", paths["target"])), {"training_seconds": 0.0}
    if kind == "retain":
        return ServedModel(name=row, adapter=remote("retain", paths["retain"])), {"training_seconds": 0.0}
    cfg = TrainConfig(
        forget=str(data / "forget10.jsonl"),
        retain=str(data / "retain90.jsonl"),
        out="",
        objective=choice(ObjectiveName, objective, "objective"),
        base="smollm2" if kind.startswith("delta") else str(paths["target"]),
        **offset_settings,
    )
    base_kind = "delta" if kind.startswith("delta") else kind
    if kind == "delta-remote":
        # a remote-mode offset depends on the target that scored its data, which its
        # settings name only by URL: the configuration goes into the cache name
        name = f"delta-remote:{objective}" if target == DEFAULT_TARGET else f"delta-remote-{target}:{objective}"
        cfg = replace(cfg, mode="remote", remote=f"http://127.0.0.1:{VLLM_PORT}/v1", remote_model="target")
        if (_offset_dir(name, cfg) / "manifest.json").is_file():
            offset, seconds = _cached_offset(name, cfg)
        else:
            with _vllm(paths["target"]):
                offset, seconds = _cached_offset(name, cfg)
    else:
        offset, seconds = _cached_offset(f"{base_kind}:{objective}", cfg)
    facts: dict[str, Any] = {
        "training_seconds": round(seconds, 1),
        "offset": offset.name,
        "objective": objective,
        "offset_settings": offset_settings,
    }
    if base_kind == "delta":
        facts["alpha"] = alpha
        pair = LocalPair.load("smollm2", offset)
        model = ServedModel(
            name=row,
            adapter=remote("target", paths["target"]),
            pair=pair,
            alpha=alpha,
            same_tokenizer=shares_tokenizer(remote("target", paths["target"]), pair),
            offset_sha256=pair.offset.sha256 if pair.offset is not None else None,
        )
        if pair.offset is not None and pair.offset.offset_threshold is not None:
            # an offset trained with its self-check (the training defaults) is served as
            # `deltaproxy serve --offset DIR` serves it: with its calibrated τ and rule
            model = replace(
                model, offset_threshold=pair.offset.offset_threshold, offset_scope=pair.offset.offset_scope
            )
            facts["offset_threshold"] = pair.offset.offset_threshold
            facts["offset_scope"] = pair.offset.offset_scope
        if kind == "delta-tau":
            tau = await _calibrated_tau(model, offset, data, max_tokens, target)
            model = replace(model, offset_threshold=tau)
            facts["offset_threshold"] = tau
        return model, facts
    return ServedModel(name=row, adapter=remote(row, _merged(paths["target"], offset))), facts


async def run(
    rows: list[str],
    settings: Any,
    keep: Path | None,
    offset_settings: dict[str, Any] | None = None,
    target: str = DEFAULT_TARGET,
    reference: Path | None = None,
) -> dict[str, Any]:
    """Audit ``rows`` and return the result file's content. ``reference`` is the retain
    model's audit folder for forget quality (default: this run's ``retain`` row, if any)."""
    from bench.tofu_lite import GENERATOR_VERSION
    from bench.tofu_models import FinetuneSettings, build, default_data
    from proxy import __version__
    from proxy.evaluation.run import run_audit

    offset_settings = dict(OFFSET_SETTINGS if offset_settings is None else offset_settings)
    data = default_data()
    t0 = time.monotonic()
    paths = build(data, FinetuneSettings(base=target))
    names = sorted({json.loads(line)["author"] for line in (data / "forget10.jsonl").read_text().splitlines()})
    files = {
        "forget": str(data / "forget10.jsonl"),
        "retain": str(data / "retain_perturbed.jsonl"),
        "holdout": str(data / "holdout10.jsonl"),
        "real_authors": str(data / "real_authors.jsonl"),
        "world_facts": str(data / "world_facts.jsonl"),
    }
    work = keep or Path(tempfile.mkdtemp(prefix="tofu-bench-"))
    adapters: dict[str, Any] = {}
    out_rows = []
    order = sorted(rows, key=lambda r: r != "retain")  # the reference first
    if "retain" in rows:
        if reference is not None:
            raise ValueError("give either a retain row or a reference audit, not both")
        ref: str | None = str(work / "retain")
    else:
        ref = str(reference) if reference is not None else None
    for row in order:
        log.info("row %s", row)
        model, facts = await _row_model(row, paths, data, adapters, settings.max_tokens, offset_settings, target)
        s = (
            replace(settings, system_prompt=GUARDRAIL.format(names=", ".join(names)))
            if row == "guardrail"
            else settings
        )
        t = time.monotonic()
        report = await run_audit(
            model,
            files,
            work / row.replace(":", "-").replace("+", "_"),
            settings=s,
            reference=ref if row != "retain" else None,
            info={"name": row},
        )
        summary = dict(report["summary"])
        ra, wf = summary.get("ra_Q_A_ROUGE"), summary.get("wf_Q_A_ROUGE")
        if ra is not None and wf is not None:
            summary["real_world_rouge"] = (ra + wf) / 2
        out_rows.append({"row": row, **facts, "audit_seconds": round(time.monotonic() - t, 1), "summary": summary})
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    for a in adapters.values():
        await a.aclose()
    return {
        "benchmark": "tofu-lite",
        "config": target,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "software": {"name": "deltaproxy", "version": __version__},
        # default_data()'s folder is named after the generator version that wrote it
        "data": {**json.loads((data / "manifest.json").read_text()), "version": GENERATOR_VERSION, "folder": data.name},
        "models": {k: str(v) for k, v in paths.items()},
        "audit_settings": settings.identity(),
        "offset_settings": offset_settings,
        "reference": ref,
        "seconds": round(time.monotonic() - t0, 1),
        "rows": out_rows,
    }


COLUMNS = (
    ("forget ROUGE-L", "forget_Q_A_ROUGE"),
    ("forget quality", "forget_quality"),
    ("model utility", "model_utility"),
    ("real-world ROUGE-L", "real_world_rouge"),
    ("MIA AUC (Min-K%)", "mia_min_k"),
    ("leak rate", "leak_rate"),
)


def render_table(result: dict[str, Any]) -> str:
    """A Markdown table of one result file."""
    head = "| row | " + " | ".join(c for c, _ in COLUMNS) + " | training (s) |"
    sep = "|---" * (len(COLUMNS) + 2) + "|"
    lines = [head, sep]
    for r in result["rows"]:
        cells = []
        for _, key in COLUMNS:
            v = r["summary"].get(key)
            cells.append("n/a" if v is None else (f"{v:.2g}" if key == "forget_quality" else f"{v:.3f}"))
        name = r["row"] + (f" (τ = {r['offset_threshold']:.2f})" if r.get("offset_threshold") is not None else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r.get('training_seconds', 0):.0f} |")
    s = result["audit_settings"]
    forget = result["data"].get("files", {}).get("forget10.jsonl", {}).get("items", 10)
    lines.append("")
    lines.append(
        f"tofu-lite v{result['data'].get('version')}, {result['data']['authors']} authors (forget: {forget} items), "
        f"{s['samples']} samples per forget item at T = 1, greedy answers of at most {s['max_tokens']} tokens; "
        f"{result['software']['version']}, {result['date'][:10]}, `bench/results/` ({result['config']})."
    )
    return "\n".join(lines)


def render_page(readme: Path) -> None:
    """Rewrite every table between the docs page's markers. ``<!-- tofu-table:start -->``:
    the newest ``bench/results/tofu-*.json`` of the SmolLM2 target with every row of
    :data:`DEFAULT_ROWS` (a run of some rows only does not replace the comparison table);
    ``<!-- tofu-table:start bench/results/NAME.json -->``: that file."""
    from bench import rewrite_tables

    def is_complete(result: dict[str, Any]) -> bool:
        rows = {r["row"] for r in result.get("rows", [])}
        return result.get("config") == DEFAULT_TARGET and set(DEFAULT_ROWS) <= rows

    def newest_complete() -> Path:
        complete = [f for f in sorted(RESULTS.glob("tofu-*.json")) if is_complete(json.loads(f.read_text()))]
        if not complete:
            raise SystemExit("no bench/results/tofu-*.json with every row yet: run python -m bench.tofu first")
        return complete[-1]

    rewrite_tables(readme, TABLE_START[:-4], TABLE_END, render_table, newest_complete)


def main(argv: list[str] | None = None) -> None:
    from proxy.evaluation.items import AuditSettings

    p = argparse.ArgumentParser(prog="python -m bench.tofu", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument(
        "--extraction-samples",
        type=int,
        help="T=1 answers per forget item after the extraction prefix (default: --samples; 0 for the leak rate alone)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=AuditSettings.concurrency,
        help="requests in flight per audit (the δ rows' pair batches them)",
    )
    p.add_argument("--keep", type=Path, help="keep (and resume) the audits in this folder")
    p.add_argument(
        "--offset-settings",
        type=offset_settings_arg,
        default=None,
        metavar="JSON",
        help=f"TrainConfig fields for the δ and direct rows' offsets (default {json.dumps(OFFSET_SETTINGS)})",
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        default=DEFAULT_TARGET,
        help="the target's base model; the pair is SmolLM2 either way (gemma3-270m: another tokenizer)",
    )
    p.add_argument(
        "--reference",
        type=Path,
        help="the retain model's audit folder (a --keep DIR/retain) for forget quality, when --rows has no retain",
    )
    p.add_argument("--json", type=Path, help="result file (default bench/results/tofu-<target>-<date>.json)")
    p.add_argument("--render", type=Path, metavar="PAGE", help="only rewrite the docs page's table from bench/results/")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.render:
        render_page(a.render)
        return
    settings = AuditSettings(
        samples=a.samples, max_tokens=a.max_tokens, concurrency=a.concurrency, extraction_samples=a.extraction_samples
    )
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    for row in rows:
        try:
            check_row(row)
        except SystemExit as exc:
            p.error(str(exc))
    if a.reference is not None and "retain" in rows:
        p.error("--reference is for runs without the retain row (that row is the reference)")
    if a.reference is not None and not (a.reference / "report.json").is_file():
        p.error(f"--reference: {a.reference / 'report.json'} does not exist (run the retain row with --keep first)")
    result = asyncio.run(run(rows, settings, a.keep, a.offset_settings, a.target, a.reference))
    out = a.json or RESULTS / f"tofu-{a.target}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(render_table(result))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
