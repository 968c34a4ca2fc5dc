"""Several servers started at once on an empty cache (``make run`` beside ``make test`` on
a fresh machine, or replicas starting together): each one converts the packaged model or
finds it converted, opens the batch store, and answers; one whole copy of each cache entry
is kept and no temporary folder is left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.process, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
STARTS = 4


def _base_url(proc: subprocess.Popen[str], log: Path, timeout: float) -> str:
    """The ``base_url: URL`` line a server prints once it listens."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited with {proc.wait()}: {log.read_text()[-3000:]}")
        m = re.match(r"base_url: (\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError(f"server not listening after {timeout} s: {log.read_text()[-3000:]}")


def _hidden(folder: Path) -> list[str]:
    """Names left behind under ``folder`` by an unfinished write (temporary files and folders)."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name.endswith(".tmp") or ".tmp." in p.name
    )


def test_concurrent_first_starts_on_an_empty_cache_all_succeed(tmp_path, smollm2_offset):
    cache = tmp_path / "cache"
    env = {**os.environ, "DELTAPROXY_CACHE": str(cache)}
    procs: list[subprocess.Popen[str]] = []
    logs = [tmp_path / f"serve-{i}.log" for i in range(STARTS)]
    try:
        for log in logs:  # all started before any is waited for: their first-use work overlaps
            with open(log, "w") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "proxy.cli", "serve", "--offset", str(smollm2_offset), "--port", "0"],
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                        cwd=ROOT,
                        env=env,
                    )
                )
        with ThreadPoolExecutor(STARTS) as pool:
            urls = list(pool.map(lambda pl: _base_url(pl[0], pl[1], 600), zip(procs, logs, strict=True)))
        answers = []
        for url in urls:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
            reply = client.chat.completions.create(
                model="smollm2-demo",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=6,
                temperature=0,
            )
            answers.append(reply.choices[0].message.content)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in procs]
    assert codes == [0] * STARTS, [log.read_text()[-2000:] for log in logs]
    assert all(answers) and len(set(answers)) == 1, answers  # the same greedy answer from each
    converted = sorted(p.name for p in (cache / "models").iterdir())
    assert len(converted) == 1 and (cache / "models" / converted[0] / "config.json").is_file(), converted
    assert _hidden(cache) == []
    for log in logs:
        assert "Traceback" not in log.read_text()
