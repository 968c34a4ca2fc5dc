"""Benchmarks (``python -m bench.<name>``); their JSON results go under ``bench/results/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report(results: Any, path: str | None) -> None:
    """Print ``results`` as indented JSON and, when ``path`` is given, write the same text
    there atomically (a temporary file beside it, then a rename: never half a file)."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        target = Path(path)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)
