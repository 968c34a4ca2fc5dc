"""Start and stop ``scripts/vllm-server`` as a child process (the tests' ``vllm_server``
fixture and ``bench.tofu``'s ``delta-remote`` rows share this)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent


def start(folder: Path, port: int, served_name: str, log: IO[str]) -> subprocess.Popen[bytes]:
    """vLLM serving the transformers folder ``folder`` as ``served_name`` on
    127.0.0.1:``port``, its output to ``log``, in a process group of its own (the engine
    runs in child processes). Returns at once; the server is ready about a minute later."""
    return subprocess.Popen(
        [
            "bash",
            str(ROOT / "scripts" / "vllm-server"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            served_name,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHON": sys.executable, "VLLM_MODEL": str(folder)},
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM to the whole group, then SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
