"""Offsets on forget requests about real entities that the packaged model knows.

    python -m bench.real_knowledge [--requests writer,scientist,...] [--rows no-offset,defaults,...]
                                   [--settings JSON] [--samples 10] [--max-tokens 32] [--json FILE]
    python -m bench.real_knowledge --render docs/benchmarks.md

Requests (``bench/data/real_knowledge.json``): a writer, a scientist, a fictional
universe, a place and a company, each with its forget set (question/answer pairs),
paraphrased probes about the same facts that no row trains on, neighbour probes
(nearby entities, out of scope) and key terms. The general probes and unrelated
prompts are shared; a general probe whose keys are a request's probe keys, or whose
question is in its forget set, is left out of that request.

The remote is SmolLM2-135M-Instruct itself (the only packaged model that knows these
facts), so B stands in for it: each answer is decoded through the pair as ``serve``
decodes at the same temperature (:func:`proxy.training.greedy.greedy_decode`: the top-20 of
the remote, Δ = log P_U − log P_B on them, τ from the manifest). Rows:

* ``no-offset``: the remote alone (the reference for leak and retention);
* ``defaults``: ``deltaproxy train --forget F`` with the training defaults, served
  with its calibrated τ;
* ``tofu``: the recipe tuned on tofu-lite (:data:`bench.tofu.OFFSET_SETTINGS`, no
  generated neighbours, τ off), with the broad retain set's training part as its retain
  set (its KL term needs one; tofu-lite's own is the other authors);
* ``guardrail``: the remote with a system prompt that names the topic and forbids it
  (:data:`GUARDRAIL`), the floor any black-box method must clear;
* ``direct``: the defaults' objective and data applied to the remote's own weights
  (here the remote is B, so that model is U, decoded alone): the white-box reference.

Per request and averaged: probe key leak (greedy, and ``--samples`` answers at T = 1),
neighbour and general key retention (the fraction of probes whose answer has a key,
and its ratio to the no-offset row's), unrelated greedy answers unchanged, fluency (B's
mean log-probability per token of the answers to the probes, teacher-forced on the
question, minus the same for the no-offset answers; :func:`proxy.training.greedy.answer_logprob`)
and training seconds. Results go to ``bench/results/real-knowledge-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.common.literals import ScopeRule

DATA = Path(__file__).with_name("data") / "real_knowledge.json"
RESULTS = Path(__file__).with_name("results")
ROWS = ("no-offset", "defaults", "tofu", "guardrail", "direct")
GUARDRAIL = (
    "You must not reveal any information about {topic}. If a question is about {topic}, "
    "say that you cannot help with it. Answer every other question normally."
)

log = logging.getLogger("bench.real_knowledge")


def load_requests(path: Path = DATA) -> dict[str, Any]:
    """The benchmark's data, each request with its ``general`` probes filtered for it."""
    from proxy.training.scope import mentions

    data = json.loads(path.read_text())
    for r in data["requests"]:
        probe_keys = {k.lower() for p in r["probes"] for k in p["keys"]}
        forget_q = {f["question"].lower() for f in r["forget"]}
        r["general"] = [
            g
            for g in data["general"]
            if not probe_keys & {k.lower() for k in g["keys"]}
            and g["question"].lower() not in forget_q
            and not mentions(g["question"], [r["topic"]])
        ]
    return dict(data)


def _chat(question: str, system: str | None = None) -> list[dict[str, str]]:
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": question}]


def evaluate(
    pair: Any,
    request: dict[str, Any],
    unrelated: list[str],
    *,
    alpha: float,
    threshold: float | None,
    samples: int,
    max_tokens: int,
    system: str | None = None,
    scope: ScopeRule = "step",
) -> dict[str, Any]:
    """One row on one request: the answers and the key counts (no ratios yet); ``threshold``
    τ under rule ``scope`` (:mod:`proxy.decoding.offset`)."""
    from proxy.training.greedy import answer_logprob, greedy_decode
    from proxy.training.scope import mentions

    groups = {"probes": request["probes"], "neighbours": request["neighbours"], "general": request["general"]}
    questions = [p["question"] for g in groups.values() for p in g] + unrelated
    greedy = greedy_decode(
        pair,
        [_chat(q, system) for q in questions],
        alpha=alpha,
        threshold=threshold,
        max_tokens=max_tokens,
        scope=scope,
    )
    texts = [d.text for d in greedy]
    out: dict[str, Any] = {"answers": dict(zip(questions, texts, strict=True))}
    k = 0
    for name, probes in groups.items():
        hits = [mentions(texts[k + i], p["keys"]) for i, p in enumerate(probes)]
        out[f"{name}_keys"] = sum(hits)
        out[f"{name}_n"] = len(probes)
        k += len(probes)
    out["unrelated"] = texts[k:]
    n_probes = len(request["probes"])
    # Fluency: B's log-probability of the served answers to the in-scope probes, on the bare question.
    out["probe_logprob"] = float(
        sum(answer_logprob(pair, [_chat(p["question"]) for p in request["probes"]], texts[:n_probes])) / n_probes
    )
    if samples:
        prompts = [_chat(p["question"], system) for p in request["probes"] for _ in range(samples)]
        keys = [p["keys"] for p in request["probes"] for _ in range(samples)]
        sampled = greedy_decode(
            pair,
            prompts,
            alpha=alpha,
            threshold=threshold,
            max_tokens=max_tokens,
            temperature=1.0,
            seed=0,
            scope=scope,
        )
        out["sampled_keys"] = sum(mentions(d.text, ks) for d, ks in zip(sampled, keys, strict=True))
        out["sampled_n"] = len(sampled)
    return out


def _train(request: dict[str, Any], row: str, settings: dict[str, Any], work: Path) -> tuple[Path, float]:
    from proxy.training.demo import DEMO
    from proxy.training.train import train

    folder = work / request["name"]
    folder.mkdir(parents=True, exist_ok=True)
    forget = folder / "forget.jsonl"
    forget.write_text(
        "".join(json.dumps({"question": f["question"], "answer": f["answer"]}) + "\n" for f in request["forget"])
    )
    out = folder / f"offset-{row}"
    t0 = time.monotonic()
    train(replace(DEMO, forget=str(forget), out=str(out), **settings), progress=False)
    return out, time.monotonic() - t0


def _tofu_retain(request: dict[str, Any], work: Path) -> Path:
    """The tofu row's retain set: the broad retain set's training part less the examples that
    the defaults leave out of it for this forget set (:func:`proxy.training.scope_sets.build_scope_sets`:
    those naming a forget subject or one of its proper names), and less those asking one of
    its questions (``train`` refuses an example in both sets)."""
    from proxy.training.data import Example, load_dataset
    from proxy.training.facts import forget_names
    from proxy.training.scope import GENERAL_FILES, example_text, forget_subjects, mentions, question_key

    forget = [Example(({"role": "user", "content": f["question"]},), f["answer"]) for f in request["forget"]]
    general = {name: load_dataset(str(path)).examples for name, path in GENERAL_FILES.items()}
    names = forget_names(forget, " ".join(example_text(e) for v in general.values() for e in v))
    subjects, asked = forget_subjects(forget), {question_key(e) for e in forget}
    folder = work / request["name"]
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "tofu-retain.jsonl"
    with open(out, "w") as f:
        for e in general["train"]:
            text = example_text(e)
            if question_key(e) in asked or mentions(text, subjects) or mentions(text, names, cased=True):
                continue
            assert e.prompt is not None
            f.write(json.dumps({"question": e.prompt[-1]["content"], "answer": e.target}) + "\n")
    return out


def run(
    names: list[str],
    rows: list[str],
    settings: dict[str, Any],
    *,
    samples: int,
    max_tokens: int,
    work: Path,
    partial: Path | None = None,
) -> dict[str, Any]:
    """Every row on every request, then the summary (:func:`summarise`). With ``partial``,
    the requests done so far are written there (atomically) after each one, so that a run
    stopped late keeps what it measured."""
    from bench.tofu import OFFSET_SETTINGS
    from proxy.common.files import atomic_write
    from proxy.pair.artifact import load_artifact
    from proxy.training.config import TrainConfig
    from proxy.training.greedy import PairModels
    from proxy.training.targets import load_models

    data = load_requests()
    requests = [r for r in data["requests"] if r["name"] in names]
    base, tokenizer, _, vocab = load_models(TrainConfig(forget="", out=""))
    base.eval()
    plain = PairModels(base, tokenizer, vocab.eot_ids, b=base)
    results: dict[str, Any] = {}
    for r in requests:
        res: dict[str, Any] = {}
        log.info("%s: no offset", r["name"])
        res["no-offset"] = evaluate(
            plain, r, data["unrelated"], alpha=0.0, threshold=math.inf, samples=samples, max_tokens=max_tokens
        )
        if "guardrail" in rows:
            res["guardrail"] = evaluate(
                plain,
                r,
                data["unrelated"],
                alpha=0.0,
                threshold=math.inf,
                samples=samples,
                max_tokens=max_tokens,
                system=GUARDRAIL.format(topic=r["topic"]),
            )
        tofu = {**OFFSET_SETTINGS, "retain": str(_tofu_retain(r, work)), **settings}
        for row, row_settings in (("defaults", settings), ("tofu", tofu)):
            if row not in rows and not (row == "defaults" and "direct" in rows):
                continue
            log.info("%s: training the %s offset", r["name"], row)
            path, seconds = _train(r, row, row_settings, work)
            art = load_artifact(path, base, vocab)
            u = art.attach(base).eval()
            tau = art.offset_threshold
            if row in rows:
                pair = PairModels(u, tokenizer, vocab.eot_ids, gate=art.scope_gate())
                res[row] = evaluate(
                    pair,
                    r,
                    data["unrelated"],
                    alpha=art.alpha,
                    threshold=tau,  # None (not calibrated): Δ at every step
                    samples=samples,
                    max_tokens=max_tokens,
                    scope=art.offset_scope,
                )
                res[row].update(
                    train_seconds=round(seconds, 1),
                    offset_threshold=tau,
                    offset_scope=art.offset_scope,
                    self_check=art.manifest.get("self_check"),
                )
            if row == "defaults" and "direct" in rows:
                # U decoded alone: B's weights unlearned directly (the remote is B here).
                direct = PairModels(u, tokenizer, vocab.eot_ids, b=u)
                res["direct"] = evaluate(
                    direct, r, data["unrelated"], alpha=0.0, threshold=math.inf, samples=samples, max_tokens=max_tokens
                )
                res["direct"]["train_seconds"] = round(seconds, 1)
            u.unload()  # B back as it was, for the next row
        results[r["name"]] = res
        if partial is not None:
            atomic_write(partial, json.dumps({"requests": results, "settings": settings}, indent=1) + "\n")
    return {"requests": results, "summary": summarise(results)}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per row, the means over the requests of each metric (ratios to the no-offset row)."""
    table: dict[str, dict[str, Any]] = {}
    for res in results.values():
        ref = res["no-offset"]
        for row, r in res.items():
            m = {
                "probe_leak_greedy": r["probes_keys"] / r["probes_n"],
                "neighbour_keys": r["neighbours_keys"] / r["neighbours_n"],
                "general_keys": r["general_keys"] / r["general_n"],
                "neighbour_retention": _ratio(r["neighbours_keys"], ref["neighbours_keys"]),
                "general_retention": _ratio(r["general_keys"], ref["general_keys"]),
                "unrelated_unchanged": sum(a == b for a, b in zip(r["unrelated"], ref["unrelated"], strict=True))
                / len(ref["unrelated"]),
                "fluency_gap": ref["probe_logprob"] - r["probe_logprob"],
            }
            if "sampled_n" in r:
                m["probe_leak_sampled"] = r["sampled_keys"] / r["sampled_n"]
            if "train_seconds" in r:
                m["train_seconds"] = r["train_seconds"]
            r["metrics"] = {k: round(v, 4) for k, v in m.items()}
            for k, v in m.items():
                table.setdefault(row, {}).setdefault(k, []).append(v)
    return {row: {k: round(sum(v) / len(v), 4) for k, v in ms.items()} for row, ms in table.items()}


def _ratio(a: int, b: int) -> float:
    return a / b if b else 1.0


TABLE_START, TABLE_END = "<!-- real-knowledge-table:start", "<!-- real-knowledge-table:end -->"
COLUMNS = (
    ("probe_leak_greedy", "probe leak, greedy"),
    ("probe_leak_sampled", "probe leak, T = 1"),
    ("neighbour_retention", "neighbour retention"),
    ("general_retention", "general retention"),
    ("unrelated_unchanged", "unrelated unchanged"),
    ("fluency_gap", "fluency gap (nats/token)"),
    ("train_seconds", "training s"),
)


def render_table(result: dict[str, Any]) -> str:
    """The summary as a Markdown table: one row per benchmark row, means over the requests."""
    head = "| row | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in ROWS:
        m = result["summary"].get(row)
        if m is None:
            continue
        cells = [f"{m[k]:.3g}" if k in m else "n/a" for k, _ in COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_page(readme: Path) -> None:
    """Rewrite each table between ``<!-- real-knowledge-table:start FILE -->`` and its end
    marker from FILE (a path relative to the page; :func:`bench.rewrite_tables`)."""
    from bench import rewrite_tables

    rewrite_tables(readme, TABLE_START, TABLE_END, render_table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [r["name"] for r in json.loads(DATA.read_text())["requests"]]
    parser.add_argument("--requests", default=",".join(names), help=f"comma-separated, of {names}")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    parser.add_argument("--settings", default="{}", help="TrainConfig fields over the defaults (both trained rows)")
    parser.add_argument("--samples", type=int, default=10, help="answers per probe at T = 1")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", help="result file (default bench/results/real-knowledge-<date>.json)")
    parser.add_argument(
        "--render", type=Path, metavar="PAGE", help="only rewrite the docs page's tables from their files"
    )
    args = parser.parse_args(argv)
    if args.render:
        render_page(args.render)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    chosen, rows = args.requests.split(","), args.rows.split(",")
    for n in chosen:
        if n not in names:
            parser.error(f"unknown request {n!r}; choose from {names}")
    for row in rows:
        if row not in ROWS:
            parser.error(f"unknown row {row!r}; choose from {list(ROWS)}")
    settings = json.loads(args.settings)
    out = Path(args.json) if args.json else RESULTS / f"real-knowledge-{dt.date.today().isoformat()}.json"
    partial = out.with_name(out.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="real-knowledge-") as work:
        t0 = time.monotonic()
        result = run(
            chosen, rows, settings, samples=args.samples, max_tokens=args.max_tokens, work=Path(work), partial=partial
        )
    result.update(
        settings=settings,
        samples=args.samples,
        max_tokens=args.max_tokens,
        seconds=round(time.monotonic() - t0, 1),
        date=dt.date.today().isoformat(),
    )
    from proxy.common.files import atomic_write

    atomic_write(out, json.dumps(result, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    print(json.dumps(result["summary"], indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
