"""Benchmarks (``python -m bench.<name>``); their JSON results go under ``bench/results/``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_until_ready(
    proc: Any, url: str, *, what: str, timeout: float, ready: Callable[[int], bool] = lambda status: status == 200
) -> None:
    """Poll ``url`` (GET) until its status passes ``ready``, while ``proc`` (a
    ``subprocess.Popen``, the server) runs.

    Raises:
        RuntimeError: the server exited first (``what`` names it).
        TimeoutError: not ready within ``timeout`` seconds.
    """
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if ready(httpx.get(url, timeout=2).status_code):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready in {timeout:.0f} s")
        time.sleep(0.5)


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


def rewrite_tables(
    page: Path,
    start: str,
    end: str,
    render: Callable[[dict[str, Any]], str],
    default: Callable[[], Path] | None = None,
) -> None:
    """Rewrite every table of the docs ``page`` (``docs/benchmarks.md``) between a
    ``{start} FILE -->`` (or ``{start} -->``) line and ``end`` with ``render`` of that result
    file (a path relative to the page), or of ``default()`` where the marker names none. The
    page is replaced atomically.

    Raises:
        SystemExit: no markers, a named file that does not exist, or a marker without a
            file and no ``default`` (``default`` may raise it too).
    """
    from proxy.common.files import atomic_write

    text = page.read_text()
    pattern = re.compile(re.escape(start) + r"(?: (\S+))? -->\n.*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no {start} --> ... {end} markers")

    def table(m: re.Match[str]) -> str:
        if m.group(1):
            source = page.parent / m.group(1)
            if not source.is_file():
                raise SystemExit(f"{page}: {m.group(1)} does not exist")
        elif default is not None:
            source = default()
        else:
            raise SystemExit(f"{page}: a {start} --> marker names no result file")
        return f"{m.group(0).split(chr(10), 1)[0]}\n{render(json.loads(source.read_text()))}\n{end}"

    atomic_write(page, pattern.sub(table, text))
