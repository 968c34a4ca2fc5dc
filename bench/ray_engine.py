"""``--engine ray`` against the single-process run: the same output, and how long each takes.

    python -m bench.ray_engine [--batch-lines 200] [--redact-lines 200] [--audit-items 12]
                               [--workers 2] [--max-tokens 8] [--kill] [--json FILE]

On the embedded default (the README's model with the demo offset, trained on first use):

1. A ``--batch-lines`` batch (chat and completions requests, greedy, the offset on, a few
   bad lines among them) through ``deltaproxy batch`` with ``--engine local`` and with
   ``--engine ray --workers N`` (a local Ray cluster started by the command).
2. A ``--redact-lines`` redaction file (the demo's forget facts written into sentences, and
   general answers that hold none of them) through ``deltaproxy redact`` the same two ways.
3. An audit of the demo's first ``--audit-items`` forget items (greedy answers, 2 samples
   at T = 1 each for the leak rate and 2 for extraction, seeded) the same two ways: the same
   ``items.jsonl`` lines and the same summary in ``report.json``.
4. With ``--kill``, the Ray batch is first killed with SIGKILL once a third of its lines
   are written, then started again: it must end with every line once.

Each command runs in its own process, timed from start to exit (the wall time a user
waits: loading the models, and for Ray starting the cluster, included). "Identical" means
the same output line for every input line (:func:`comparable`: the per-run ids and
timestamps that OpenAI's format gives every answer are left out; the order of the lines in
the file is the order they finished in, under either engine). Prints a JSON summary;
``tests/test_ray_engine.py`` runs the same at a smaller size.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PER_RUN = {"id", "request_id", "created"}
"""Fields that differ on every run by design: OpenAI's per-answer ids and timestamps."""


def comparable(line: dict[str, Any]) -> Any:
    """An output line less :data:`PER_RUN` fields, at any depth."""

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in PER_RUN}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(line)


def _key(line: dict[str, Any]) -> str:
    """The input line an output line answers: a bad line's number, a batch line's
    ``custom_id``, a redaction's ``id``, an audit item's split and index."""
    err = line.get("error") or {}
    if isinstance(err, dict) and "line" in err:
        return f"line:{err['line']}"
    if "split" in line:
        return f"{line['split']}:{line['index']}"
    return f"id:{line.get('custom_id', line.get('id'))}"


def differences(a: Path, b: Path) -> dict[str, Any]:
    """How two outputs of the same input differ: lines present in one only, lines written
    twice, and lines whose :func:`comparable` content differs (up to 3 shown)."""

    def read(p: Path) -> tuple[dict[str, Any], int]:
        rows = [json.loads(x) for x in p.read_bytes().splitlines() if x.strip()]
        return {_key(r): comparable(r) for r in rows}, len(rows)

    (la, na), (lb, nb) = read(a), read(b)
    differ = sorted(k for k in la.keys() & lb.keys() if la[k] != lb[k])
    return {
        "lines": [na, nb],
        "duplicates": [na - len(la), nb - len(lb)],
        "only_in_one": sorted(la.keys() ^ lb.keys())[:10],
        "differ": len(differ),
        "examples": [{"key": k, "local": la[k], "ray": lb[k]} for k in differ[:3]],
        "identical": la == lb and na == len(la) and nb == len(lb),
    }


def write_batch(path: Path, n: int, max_tokens: int) -> None:
    """``n`` lines: questions of the demo's general check set and forget set, as chat and as
    completions, greedy with the offset on; every 50th line is not a request (a bad line,
    answered by the driver)."""
    from proxy.config import DEFAULT_MODEL
    from proxy.training.demo import DEMO_FORGET
    from proxy.training.scope import GENERAL_FILES

    questions = [json.loads(x)["question"] for x in open(DEMO_FORGET) if x.strip()]
    questions += [json.loads(x)["question"] for x in open(GENERAL_FILES["check"]) if x.strip()]
    with open(path, "w") as f:
        for i in range(n):
            if i % 50 == 49:
                f.write("{not json\n")
                continue
            q = questions[i % len(questions)]
            body: dict[str, Any] = {"model": DEFAULT_MODEL, "max_tokens": max_tokens, "temperature": 0}
            if i % 3:
                body["messages"] = [{"role": "user", "content": q}]
                url = "/v1/chat/completions"
            else:
                body["prompt"] = f"Q: {q}\nA:"
                url = "/v1/completions"
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}) + "\n")


def write_redaction(path: Path, n: int) -> None:
    """``n`` lines ``{id, messages, output}``: each demo forget fact in a sentence, then the
    demo's general answers (which hold no forget fact) to fill."""
    from proxy.training.demo import DEMO_FORGET
    from proxy.training.scope import GENERAL_FILES

    rows = []
    for f in (json.loads(x) for x in open(DEMO_FORGET) if x.strip()):
        rows.append((f["question"], f"Sure! That would be {f['answer'].rstrip('.')}, as far as I know."))
    for split in ("calibration", "check"):
        rows += [(r["question"], r["answer"]) for r in (json.loads(x) for x in open(GENERAL_FILES[split])) if r]
    with open(path, "w") as f:
        for i in range(n):
            q, a = rows[i % len(rows)]
            line = {"id": f"out-{i}", "messages": [{"role": "user", "content": q}], "output": a}
            f.write(json.dumps(line) + "\n")


def _run(cmd: list[str], kill_after_lines: int | None = None, out: Path | None = None) -> float:
    """Run a ``deltaproxy`` command to its end (or, with ``kill_after_lines``, SIGKILL it once
    ``out`` holds that many lines); returns its wall seconds.

    Raises:
        RuntimeError: the command failed (its output named).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "proxy.cli", *cmd, "--no-progress"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if kill_after_lines is not None and out is not None:
        while proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= kill_after_lines:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return time.monotonic() - started
            time.sleep(0.2)
    text, _ = proc.communicate()
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text.decode(errors='replace')[-3000:]}")
    return seconds


def run(
    tmp: Path,
    *,
    batch_lines: int,
    redact_lines: int,
    workers: int,
    max_tokens: int,
    kill: bool,
    audit_items: int = 0,
) -> dict[str, Any]:
    """The whole comparison in folder ``tmp``; the JSON summary."""
    from proxy.training.demo import demo_offset

    demo_offset(progress=False)  # trained (once) before any clock starts
    ray_opts = ["--engine", "ray", "--workers", str(workers)]
    result: dict[str, Any] = {"workers": workers, "cpus": os.cpu_count()}
    if batch_lines:
        inp = tmp / "batch.jsonl"
        write_batch(inp, batch_lines, max_tokens)
        local, ray = tmp / "batch-local.jsonl", tmp / "batch-ray.jsonl"
        t_local = _run(["batch", "--in", str(inp), "--out", str(local)])
        killed = None
        if kill:
            t_kill = _run(["batch", "--in", str(inp), "--out", str(ray), *ray_opts], batch_lines // 3, ray)
            killed = {"killed_at_lines": ray.read_bytes().count(b"\n"), "seconds": round(t_kill, 1)}
        t_ray = _run(["batch", "--in", str(inp), "--out", str(ray), *ray_opts])
        result["batch"] = {
            "lines": batch_lines,
            "max_tokens": max_tokens,
            "local_s": round(t_local, 1),
            "ray_s": round(t_ray, 1),
            **({"killed_then_resumed": killed} if killed else {}),
            **differences(local, ray),
        }
    if redact_lines:
        inp = tmp / "redact.jsonl"
        write_redaction(inp, redact_lines)
        local, ray = tmp / "redact-local.jsonl", tmp / "redact-ray.jsonl"
        t_local = _run(["redact", "--in", str(inp), "--out", str(local)])
        t_ray = _run(["redact", "--in", str(inp), "--out", str(ray), *ray_opts])
        redacted = sum(bool(json.loads(x).get("spans")) for x in local.read_bytes().splitlines() if x.strip())
        result["redact"] = {
            "lines": redact_lines,
            "redacted": redacted,
            "local_s": round(t_local, 1),
            "ray_s": round(t_ray, 1),
            **differences(local, ray),
        }
    if audit_items:
        from proxy.training.demo import DEMO_FORGET

        forget = tmp / "forget.jsonl"
        forget.write_text("".join(open(DEMO_FORGET).readlines()[:audit_items]))
        opts = ["--forget", str(forget), "--samples", "2", "--max-tokens", "16"]
        t_local = _run(["audit", *opts, "--out", str(tmp / "audit-local")])
        t_ray = _run(["audit", *opts, "--out", str(tmp / "audit-ray"), *ray_opts])
        reports = [json.loads((tmp / d / "report.json").read_text())["summary"] for d in ("audit-local", "audit-ray")]
        result["audit"] = {
            "items": audit_items,
            "local_s": round(t_local, 1),
            "ray_s": round(t_ray, 1),
            "same_summary": reports[0] == reports[1],
            **differences(tmp / "audit-local" / "items.jsonl", tmp / "audit-ray" / "items.jsonl"),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ray_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-lines", type=int, default=200)
    p.add_argument("--redact-lines", type=int, default=200)
    p.add_argument("--audit-items", type=int, default=12, help="demo forget items audited (0: no audit)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8, help="most tokens per batch answer")
    p.add_argument("--kill", action="store_true", help="SIGKILL the Ray batch a third of the way, then resume it")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)
    from bench import report

    with tempfile.TemporaryDirectory() as tmp:
        result = run(
            Path(tmp),
            batch_lines=args.batch_lines,
            redact_lines=args.redact_lines,
            workers=args.workers,
            max_tokens=args.max_tokens,
            kill=args.kill,
            audit_items=args.audit_items,
        )
    report(result, args.json)


if __name__ == "__main__":
    main()
