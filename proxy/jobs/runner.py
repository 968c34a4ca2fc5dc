"""The one resumable JSONL runner that batch runs (:mod:`proxy.jobs.batch`), redaction
(:mod:`proxy.redaction.redact`) and the audit (:mod:`proxy.evaluation.run`) share.

An input's items are answered one output line each, appended to the output file as they
finish; the output file is the record of what is done. Each line is appended with one
``write`` (the OS holds it, so a SIGKILL loses at most the line being written); a restarted
run reads the output back, drops a last line cut off mid-write, finds the items already
answered by their key (an id, a line number, a split and index) and answers only the
others, so no line is lost or written twice. The progress file ``<out>.progress.json``
(written atomically, :func:`proxy.common.files.atomic_write`) ties the output to its
input's sha256, so an output is never continued from a different input, and holds the
counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from proxy.common.aio import gather_or_cancel
from proxy.common.files import atomic_write
from proxy.common.jsontext import json_bytes
from proxy.jobs.ray_engine import RaySettings, WorkerFactory, answer_all, connect, disconnect

T = TypeVar("T")

SAVE_EVERY_S = 1.0
"""Seconds between two progress-file updates while lines are written."""


class OutputError(ValueError):
    """An output file that cannot be continued from this input."""


def input_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of an input file with their 1-based line numbers (split at
    ``\\n`` only, so the numbers are those an editor shows)."""
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            yield n, raw


def answer_key(line: dict[str, Any], id_field: str) -> str:
    """What identifies the input line an output line answers: for an error line
    (``"error": {"line": n, …}``) its line number, else its ``id_field``."""
    err = line.get("error")
    return f"line:{int(err['line'])}" if err else f"id:{line[id_field]}"


class ResumableOutput:
    """An append-only JSONL output that an interrupted run continues.

    Each line is appended with one ``write`` (and flushed by the OS, so a
    SIGKILL loses at most the line being written); :meth:`open` drops a last
    line cut off mid-write and returns the keys of the lines already there.
    ``<out>.progress.json`` (replaced atomically) records the input's sha256,
    so an output is never continued from another input, and the counts.

    ``exclusive``: the output is locked (``flock``) while open, so that a second run
    on the same output (a command started twice) is refused instead of writing every
    line a second time. The server's batches leave it off: their leases already give a
    batch one runner, and a lock on a shared volume could outlive a dead replica.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        input_data: bytes,
        key: Callable[[dict[str, Any]], str],
        *,
        exclusive: bool = False,
    ) -> None:
        self.path = Path(path)
        self.digest = hashlib.sha256(input_data).hexdigest()
        self.key = key
        self.exclusive = exclusive
        self.progress_file = self.path.with_name(self.path.name + ".progress.json")
        self._fd: int | None = None

    def open(self, expected: set[str]) -> list[dict[str, Any]]:
        """Check and repair the output; return the lines already written.

        Raises:
            OutputError: the output belongs to another input, is not this kind
                of output, answers keys that are not in ``expected``, or (``exclusive``)
                another run has it open.
        """
        if not self.exclusive:
            return self._open(expected)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{self.path} is being written by another run; wait for it or use another file") from None
        try:
            lines = self._open(expected)
        except BaseException:
            if not existed and not self.progress_file.exists():
                self.path.unlink(missing_ok=True)  # leave nothing behind
            os.close(fd)
            raise
        assert self._fd is not None
        os.close(self._fd)
        self._fd = fd  # the locked descriptor, opened for appending like the other
        return lines

    def _open(self, expected: set[str]) -> list[dict[str, Any]]:
        if self.progress_file.exists():
            if json.loads(self.progress_file.read_text()).get("input_sha256") != self.digest:
                raise OutputError(f"{self.path} was written from another input file; use another output file")
        elif self.path.exists() and self.path.stat().st_size:
            raise OutputError(f"{self.path} exists and has no progress file; use another output file")
        lines: list[dict[str, Any]] = []
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(end)
            for n, raw in enumerate(data[:end].splitlines(), start=1):
                try:
                    obj = json.loads(raw)
                    key = self.key(obj)
                except (json.JSONDecodeError, AttributeError, TypeError, KeyError, ValueError) as exc:
                    raise OutputError(f"{self.path}: line {n} is not a line of this output; use another file") from exc
                if key not in expected:
                    raise OutputError(f"{self.path} answers lines that are not in the input; use another output file")
                lines.append(obj)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.progress_file.exists():
            # Name the input before the first line is written: a run killed at any point
            # (even before its first own progress update) can be continued.
            self.save_progress({"lines": len(lines)})
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return lines

    def write(self, obj: dict[str, Any]) -> None:
        assert self._fd is not None, "open() first"
        os.write(self._fd, json_bytes(obj) + b"\n")

    def save_progress(self, counts: dict[str, Any]) -> None:
        progress = {"input_sha256": self.digest, **counts, "updated_at": int(time.time())}
        atomic_write(self.progress_file, json.dumps(progress, indent=1))

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


class Bar(Protocol):
    """What the runner needs of a progress bar (a ``tqdm``)."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class OnRay(Generic[T]):
    """Answer a run's items on Ray (:mod:`proxy.jobs.ray_engine`) instead of in this process.

    ``payload`` turns an item into the JSON object a worker answers, or ``None`` for an
    item that needs no model (a bad line), which this process answers itself.
    """

    settings: RaySettings
    factory: WorkerFactory
    payload: Callable[[T], dict[str, Any] | None]


class _Stopped(Exception):
    """The run was cancelled while Ray was still sending lines back."""


class LineRunner(Generic[T]):
    """Answers the items of one input not yet answered in a :class:`ResumableOutput`.

    ``item_key`` names the output line that will answer an item; ``line_key`` reads the
    same key back from an output line. :meth:`open` checks and repairs the output and
    keeps the items still to answer (:attr:`todo`); :meth:`run` answers them.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        input_data: bytes,
        *,
        item_key: Callable[[T], str],
        line_key: Callable[[dict[str, Any]], str],
        exclusive: bool = False,
    ) -> None:
        self.output = ResumableOutput(out, input_data, line_key, exclusive=exclusive)
        self.item_key = item_key
        self.todo: list[T] = []

    def open(self, items: Sequence[T]) -> list[dict[str, Any]]:
        """The lines already written (see :meth:`ResumableOutput.open`); the items that no
        line answers yet become :attr:`todo`, in the order of ``items``.

        Raises:
            OutputError: the output cannot be continued from this input.
        """
        done = self.output.open({self.item_key(i) for i in items})
        answered = {self.output.key(line) for line in done}
        self.todo = [i for i in items if self.item_key(i) not in answered]
        return done

    async def run(
        self,
        answer: Callable[[T], Awaitable[dict[str, Any]]],
        *,
        counts: Callable[[], dict[str, Any]],
        bar: Bar,
        concurrency: int = 1,
        on_line: Callable[[dict[str, Any]], None] | None = None,
        ray: OnRay[T] | None = None,
    ) -> None:
        """Answer every item of :attr:`todo` and append each answer as it finishes.

        With ``ray``, the items that have a payload are answered by Ray workers and
        ``concurrency`` is theirs (``ray.settings``); ``answer`` answers the others here,
        first. The lines come back to this process, which writes them as below.

        ``concurrency`` workers take the items in order; an ``answer`` that finishes
        without waiting is written before the next item is taken. After each line:
        ``bar`` advances, ``on_line`` gets it, and at most every :data:`SAVE_EVERY_S`
        the progress file gets ``counts()``. At the end, on success or not, the bar
        is closed, the output flushed to disk and closed, and the progress saved.
        When ``answer`` or ``on_line`` raises, the other workers are cancelled
        (:func:`proxy.common.aio.gather_or_cancel`) before the output is closed.
        """
        output = self.output
        queue = deque(self.todo)
        last_save = time.monotonic()

        def write(line: dict[str, Any]) -> None:
            nonlocal last_save
            output.write(line)
            bar.update()
            if on_line is not None:
                on_line(line)
            if time.monotonic() - last_save > SAVE_EVERY_S:
                output.save_progress(counts())
                last_save = time.monotonic()

        async def worker() -> None:
            while queue:
                write(await answer(queue.popleft()))

        try:
            output.save_progress(counts())
            if ray is None:
                await gather_or_cancel(*(worker() for _ in range(min(concurrency, len(queue)))))
            else:
                await _on_ray(ray, list(queue), answer, write)
        finally:
            bar.close()
            output.close()
            output.save_progress(counts())


async def _on_ray(
    ray: OnRay[T],
    items: list[T],
    answer: Callable[[T], Awaitable[dict[str, Any]]],
    write: Callable[[dict[str, Any]], None],
) -> None:
    """The items without payload answered here, the others on Ray (its results written from a
    thread; once this is cancelled or fails, no line is written any more, so the caller can
    close the output)."""
    payloads: list[dict[str, Any]] = []
    for item in items:
        p = ray.payload(item)
        if p is None:
            write(await answer(item))
        else:
            payloads.append(p)
    lock, stop = threading.Lock(), threading.Event()

    def guarded(line: dict[str, Any]) -> None:
        with lock:
            if stop.is_set():
                raise _Stopped
            write(line)

    if not payloads:
        return
    started = connect(ray.settings)  # here, in the main thread (Ray's signal handlers)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if not done.done():
            done.set_result(None) if exc is None else done.set_exception(exc)

    def results() -> None:
        error: BaseException | None = None
        try:
            answer_all(payloads, ray.factory, ray.settings, guarded, stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, error)

    # A daemon thread, not asyncio.to_thread: when the run is interrupted, the thread may be
    # waiting on Ray for its next line, and the process must not wait for it to exit.
    threading.Thread(target=results, name="ray-results", daemon=True).start()
    try:
        await done
    finally:
        with lock:
            stop.set()
        disconnect(started)
