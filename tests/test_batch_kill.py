"""Issue 7, "Must show": a batch of 1,000 lines against the embedded default
(the README's model, with the demo offset), killed with SIGKILL at a random
point and restarted, ends with exactly 1,000 lines, one per custom_id."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.config import DEFAULT_MODEL
from proxy.training.demo import demo_offset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

N = 1000
ROOT = Path(__file__).resolve().parents[1]


def _input(path: Path) -> None:
    """Short lines, most with ``offset_alpha: 0``: with the offset on, each step scores the
    remote's 20 candidates with U and B (about 0.4 s per line on 2 cores), so every tenth
    line uses it (chat and completions) and the rest keep the test to a few minutes."""
    rng = random.Random(7)
    words = ["cats", "rain", "tea", "maps", "jazz", "salt", "moss", "glass"]
    with open(path, "w") as f:
        for i in range(N):
            topic = rng.choice(words)
            body: dict = {"model": DEFAULT_MODEL, "max_tokens": 2, "temperature": 0}
            if i % 10:
                body["offset_alpha"] = 0.0
            if i % 20 == 0:
                body["messages"] = [{"role": "user", "content": f"One word about {topic}."}]
                url = "/v1/chat/completions"
            else:
                body["prompt"] = f"{topic} {i}:"
                url = "/v1/completions"
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}) + "\n")


def _count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkilled_batch_restarts_without_losing_or_repeating_a_line(tmp_path: Path):
    demo_offset(progress=False)  # trained (once) before the clock of the run starts
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _input(inp)
    cmd = [sys.executable, "-m", "proxy.cli", "batch", "--in", str(inp), "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kill_at = random.Random().randint(20, N // 2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while _count(out) < kill_at:
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "the batch is too slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_with = _count(out)
    assert killed_with < N
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_bytes().splitlines()]
    ids = [x["custom_id"] for x in lines]
    assert len(lines) == N and len(set(ids)) == N
    assert set(ids) == {f"req-{i}" for i in range(N)}
    assert all(x["response"]["status_code"] == 200 for x in lines), [x for x in lines if x["error"]][:3]
    assert f"{N} lines: {N} completed, 0 failed" in done.stdout
    print(f"killed at {killed_with} lines; the restart finished the other {N - killed_with}")
