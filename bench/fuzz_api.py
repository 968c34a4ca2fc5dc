"""API fuzzing with schemathesis against the served proxy's own OpenAPI document.

Starts the deterministic upstream (:mod:`bench.fake_upstream`) and the proxy as plain
processes on 127.0.0.1 (audit log and keys on, so that the gateway is exercised too), then
runs ``schemathesis run`` on ``GET /openapi.json``: every operation, valid and invalid
bodies, parameters and headers generated from the document. Checks: no response is a
5xx (``not_a_server_error``), and neither a response nor the proxy's log holds a Python
traceback. Prints a JSON summary (and writes it with ``--json``)::

    python -m bench.fuzz_api --cases 10000

``--cases`` is spread over the document's operations (schemathesis's
``--max-examples`` is per operation and phase).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench.load import ROOT, proxy_config, start

KEY = "sk-fuzz-0123456789"


def run(cases: int, work: Path, *, seed: int = 0, workers: int = 1, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fuzz a fresh proxy with about ``cases`` generated requests; the summary (see the
    module docstring). ``work``: a folder for the config, the logs and the report."""
    up, upstream = start([sys.executable, "-m", "bench.fake_upstream"])
    audit = work / "audit.jsonl"
    cfg = work / "proxy.toml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    server = f'[server]\ndata_dir = "{work / "data"}"\n'
    keys = f'\n[[server.keys]]\nid = "fuzz"\nsha256 = "{digest}"\n'
    cfg.write_text(proxy_config(upstream, audit).replace("[server]\n", server, 1) + keys)
    log = work / "proxy.log"
    with open(log, "w") as err:  # a file, not a pipe: thousands of log lines would fill a pipe and stall the proxy
        proxy = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--port", "0"],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
        )  # fmt: skip
    try:
        root = _listening(proxy, log).removesuffix("/v1")
        spec = httpx.get(f"{root}/openapi.json", timeout=60).json()
        operations = sum(len(v) for v in spec["paths"].values())
        per_operation = max(1, cases // operations)
        reports = work / "report"
        started = time.monotonic()
        st = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{root}/openapi.json",
                "--url",
                root,
                "--checks",
                "not_a_server_error,no_traceback",
                "--max-examples",
                str(per_operation),
                "--seed",
                str(seed),
                "--workers",
                str(workers),
                "--header",
                f"Authorization: Bearer {KEY}",
                "--request-timeout",
                "60",
                "--suppress-health-check",
                "all",
                "--report",
                "ndjson",
                "--report-dir",
                str(reports),
                "--no-color",
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "SCHEMATHESIS_HOOKS": "bench.fuzz_api_checks"},
        )
        seconds = time.monotonic() - started
    finally:
        proxy.terminate()
        up.terminate()
        proxy_rc = proxy.wait(60)
        up.wait(60)
    stderr = log.read_text()
    sent, statuses = _statuses(reports)
    return {
        "cases_requested": cases,
        "operations": operations,
        "max_examples_per_operation": per_operation,
        "requests_sent": sent,
        "statuses": statuses,
        "server_errors": sum(n for s, n in statuses.items() if s.startswith("5")),
        "tracebacks_in_log": stderr.count("Traceback"),
        "schemathesis_exit": st.returncode,
        "schemathesis_summary": st.stdout[-3000:],
        "seconds": round(seconds, 1),
        "proxy_exit": proxy_rc,
    }


def _listening(proc: subprocess.Popen[str], log: Path, timeout: float = 120) -> str:
    """The URL of the ``base_url: URL`` line a server prints once it listens."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the proxy exited ({proc.wait()}): {log.read_text()[-2000:]}")
        if m := re.match(r"base_url: (\S+)", line):
            return m.group(1)
    proc.kill()
    raise RuntimeError(f"the proxy did not start in {timeout} s")


def _statuses(report: Path) -> tuple[int, dict[str, int]]:
    """Requests sent and their HTTP statuses, from schemathesis's NDJSON event stream."""
    counts: dict[str, int] = {}
    for path in report.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            for status in re.findall(r'"status_code":\s*(\d{3})', line):
                counts[status] = counts.get(status, 0) + 1
    return sum(counts.values()), dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz_api", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10000, help="generated requests, spread over the operations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="concurrent schemathesis workers (1: the run is reproducible from its seed)",
    )
    p.add_argument("--json", help="result file (default bench/results/fuzz-api-<date>.json)")
    p.add_argument("extra", nargs="*", help="after --: more `schemathesis run` options (--include-path …)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.cases, Path(tmp), seed=args.seed, workers=args.workers, extra=tuple(args.extra))
    path = args.json or str(ROOT / "bench" / "results" / f"fuzz-api-{datetime.date.today():%Y%m%d}.json")
    report(result, path)


if __name__ == "__main__":
    main()
