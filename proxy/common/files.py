"""Files written so that a reader, or a second process, never sees half of one.

One way to write a file (:func:`atomic_file`, :func:`atomic_write`): into a temporary file
in the same folder, flushed to disk, then renamed over the target (``rename(2)`` is atomic
within one file system). One way to publish a folder built on first use
(:func:`publish_dir`): built under a temporary name, then renamed; when another process
published the same folder first, its copy is kept and ours is dropped, which is success
(two servers may start at once on an empty cache).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
"""The data files that ship inside the package (``proxy/resources``)."""


def cache_dir() -> Path:
    """``$DELTAPROXY_CACHE``, else ``~/.cache/deltaproxy`` (created)."""
    root = os.environ.get("DELTAPROXY_CACHE") or Path.home() / ".cache" / "deltaproxy"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on a clean exit it is flushed to disk and
    renamed onto ``path``, on an exception it is removed and ``path`` is left as it was.

    The writer gets a path, so libraries that write files themselves (``torch.save``,
    ``Figure.savefig``) can use it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes) -> None:
    """``data`` (text as UTF-8, or bytes) to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def new_dir_beside(target: Path) -> Path:
    """An empty temporary folder in ``target``'s parent (created), to build ``target`` in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))


def publish_dir(tmp: Path, target: Path, *, replace: bool = False) -> Path:
    """Rename the finished folder ``tmp`` onto ``target`` and return ``target``.

    Where ``target`` already exists: with ``replace`` it is swapped out for ``tmp`` (the old
    folder is moved aside first, then removed); without, another process finished first, its
    folder is kept and ``tmp`` is removed. ``tmp`` is removed on any error.
    """
    try:
        try:
            os.replace(tmp, target)
            return target
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                raise
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
