"""proxy.common.files: one way to write a file, one way to publish a folder built on first
use, safe when several processes do it at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from proxy.common.files import atomic_file, atomic_write, new_dir_beside, publish_dir


def test_atomic_write_replaces_whole_and_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "a" / "out.json"
    atomic_write(path, "one")
    atomic_write(path, b"two")
    assert path.read_text() == "two"
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "two" and sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def _build(target: str, marker: str, start: Any) -> None:
    start.wait()
    tmp = new_dir_beside(Path(target))
    (tmp / "config.json").write_text(marker)
    publish_dir(tmp, Path(target))


def test_concurrent_first_builds_of_a_folder_all_succeed(tmp_path):
    """Four processes build the same cache folder at once (as four servers starting on an
    empty cache convert the same model): each succeeds, one copy is kept whole, no
    temporary folder is left."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    target = tmp_path / "models" / "smollm2"
    procs = [ctx.Process(target=_build, args=(str(target), f"copy {i}", start)) for i in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert (target / "config.json").read_text().startswith("copy ")
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2"]


def test_publish_dir_replaces_on_request_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "out"
    first = new_dir_beside(target)
    (first / "f").write_text("1")
    publish_dir(first, target)
    second = new_dir_beside(target)
    (second / "f").write_text("2")
    publish_dir(second, target)  # someone else's copy is there: it is kept
    assert (target / "f").read_text() == "1" and not second.exists()
    third = new_dir_beside(target)
    (third / "f").write_text("3")
    publish_dir(third, target, replace=True)
    assert (target / "f").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    broken = new_dir_beside(tmp_path / "missing" / "deeper")
    with pytest.raises(OSError):
        publish_dir(broken, tmp_path / "no-such-parent" / "x")
    assert not broken.exists()
