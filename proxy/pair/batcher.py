"""Dynamic batching of the local pair's tree passes across concurrent requests.

:class:`TreeJob` is one :class:`proxy.pair.scorer.PairScorer` tree pass waiting to run;
:class:`TreeBatcher` queues the jobs of every request computing on a pair and runs them in
batches (one forward pass, :func:`proxy.pair.forward.forward_trees`) on one
thread, as :class:`BatchSettings` says.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from proxy import release_free_memory
from proxy.pair import compute
from proxy.pair.sides import Side

if TYPE_CHECKING:  # annotations only: proxy.config imports BatchSettings without loading torch
    import numpy as np
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    """Dynamic batching of the pair's tree passes across concurrent requests
    (``[server]`` ``pair_max_batch``, ``pair_batch_window_ms``, ``pair_max_batch_tokens``).

    The batcher waits at most ``window_s`` for requests still computing on the CPU
    to bring their next pass, never while every running request is already queued
    (a single stream runs at once). Then, while the batch has room, it waits for
    answers that are between passes (their remote call in flight) at most a quarter of
    the last pass's time and 100 ms (:attr:`TreeBatcher.FOLLOW_FRACTION`): 16
    token-by-token streams against a fast remote then run as one batch of 15 on
    average instead of alternating halves of 8 (16 streams over one: 3.8x → 6.4x,
    ``bench.speed``). A batch holds at most ``max_batch`` requests
    and ``max_tokens`` tree positions after padding (one request's longer tree
    runs alone): a 16-row one-token pass of SmolLM2-135M costs 4.1x a single row's
    time for 16x the work, a 4-row 128-token pass 3.2x for 4x
    (``bench.pair_batching``, 2 cores), so long trees gain little from company
    and pay for the padding of shorter ones.
    """

    max_batch: int = 16
    window_s: float = 0.005
    max_tokens: int = 256


@dataclass
class TreeJob:
    """One :class:`proxy.pair.scorer.PairScorer` tree pass waiting for :class:`TreeBatcher`:
    the tree's ``n`` token ids, which cached and tree positions each may see (``allowed``,
    ``[n, L + n]`` bool, ``L`` the cache length), its positions (``[n]``), the positions
    whose next-token rows are read (``keep``), and the scorer's caches by model
    (:class:`~proxy.pair.sides.Side`), of which it runs as ``sides`` (every model by default).

    ``reduce(model, rows)``, when given, runs inside the pass on each model's rows
    (``[len(keep), V]`` float32, valid only during the call), and its value
    is the job's result for that model instead of the rows: the rows of a batch are
    then freed as soon as the pass ends, instead of staying alive until every request
    in it has read them (at 16 streams about 150 MB of a 96-position draft's rows).
    It must not change state: a failed batch runs it again."""

    ids: list[int]
    allowed: torch.Tensor
    positions: torch.Tensor
    keep: list[int]
    caches: dict[Side, Any]
    reduce: Callable[[Side, np.ndarray], Any] | None = None
    sides: tuple[Side, ...] | None = None
    """The models the job runs as (a subset of the pair's); ``None``: every model of the pair."""
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[Side, Any] | None = None
    error: BaseException | None = None

    def output(self, model: Side, rows: np.ndarray) -> Any:
        """The job's result for ``model`` from its rows: ``reduce``'s value, or the rows."""
        return self.reduce(model, rows) if self.reduce else rows


class _Closed(Exception):
    """The batcher was closed (its thread ends)."""


class TreePasses(Protocol):
    """What a :class:`TreeBatcher` runs its batches on: :class:`proxy.pair.local.LocalPair`."""

    def forward_trees(self, jobs: Sequence[TreeJob]) -> list[dict[Side, Any]]: ...


class TreeBatcher:
    """One queue of tree passes for a pair, run in batches by one thread.

    Requests computing on the pair are counted (:meth:`enter`, :meth:`leave`), and so are
    answers decoding with it (:meth:`open_stream`, :meth:`close_stream`); a batch starts
    when every computing request is queued, when ``max_batch`` are, or ``window_s`` after
    the first arrived, whichever comes first, and then waits for answers between passes
    as :class:`BatchSettings` says. The first queued
    job always runs; the others join it nearest in tree size first while the
    padded batch stays within ``max_tokens`` positions. A batch that fails runs
    again job by job, so that one bad request fails alone.

    Once the pair has been idle (no request computing, nothing queued) for
    :data:`IDLE_RELEASE_S` after passes ran, the thread gives the memory that malloc
    holds freed back to the system (:func:`proxy.release_free_memory`): the rows of a
    burst of requests do not stay resident after it.
    """

    IDLE_RELEASE_S = 1.0
    FOLLOW_FRACTION = 0.25
    """A batch waits for answers between passes at most this fraction of the last pass's time…"""
    FOLLOW_MAX_S = 0.1
    """…and at most this long."""

    def __init__(self, pair: TreePasses, settings: BatchSettings) -> None:
        self.pair = pair
        self.settings = settings
        self._cond = threading.Condition()
        self._queue: list[TreeJob] = []
        self._active = 0
        self._streams = 0
        """Answers being decoded with the pair (:meth:`open_stream`), computing or not."""
        self._thread: threading.Thread | None = None
        self._closed = False
        self._used = False
        """Passes have run since memory was last released (:data:`IDLE_RELEASE_S`)."""
        self._idle_since = 0.0
        """When the last request left or the last batch ended (``time.monotonic()``)."""
        self.releases = 0
        """Times freed memory was given back after the pair went idle."""
        self._last_pass_s = 0.0
        """Wall time of the last batched pass."""
        self.passes = 0
        """Batched passes run (:func:`proxy.pair.forward.forward_trees` calls)."""
        self.jobs = 0
        """Tree passes run (``jobs / passes`` is the mean batch size)."""

    def enter(self) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the pair is closed")
            self._active += 1
            self._used = True
            self._start()

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._idle_since = time.monotonic()
            self._cond.notify_all()

    def open_stream(self) -> None:
        """An answer starts decoding with the pair: between its passes (while it waits for the
        remote) a batch may wait up to the window for it."""
        with self._cond:
            self._streams += 1

    def close_stream(self) -> None:
        with self._cond:
            self._streams -= 1
            self._cond.notify_all()

    def run(self, job: TreeJob) -> dict[Side, Any]:
        """Queue ``job`` and wait for its rows (see :func:`proxy.pair.forward.forward_trees`).
        Without batching (``max_batch`` 1) the pass runs on the calling thread."""
        if self._closed:
            raise RuntimeError("the pair is closed")
        if self.settings.max_batch == 1:
            self._used = True
            self.jobs += 1
            self.passes += 1
            return compute.run(self.pair.forward_trees, [job])[0]
        with self._cond:
            if self._closed:
                raise RuntimeError("the pair is closed")
            self._queue.append(job)
            self._used = True
            self._start()
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Stop the batcher's thread once the queued passes have run; later :meth:`run` calls raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _start(self) -> None:
        """Start the batcher's thread if it is not running (``self._cond`` held)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="pair-batcher", daemon=True)
            self._thread.start()

    def _idle(self) -> bool:
        """Wait for queued work (``self._cond`` held); ``True`` when the pair has instead been
        idle for :data:`IDLE_RELEASE_S` after passes ran (time to release memory)."""
        while not self._queue:
            if self._closed:
                raise _Closed
            if self._used and self._active == 0:
                left = self._idle_since + self.IDLE_RELEASE_S - time.monotonic()
                if left <= 0:
                    self._used = False
                    return True
                self._cond.wait(left)
            else:
                self._cond.wait()
        return False

    def _loop(self) -> None:
        compute.single_threaded()
        while True:
            with self._cond:
                try:
                    idle = self._idle()
                except _Closed:
                    return
                if idle:
                    self.releases += 1
                    batch = []
                else:
                    batch = self._wait_and_pick()
            if idle:
                release_free_memory()
            else:
                t0 = time.monotonic()
                self._run(batch)
                with self._cond:
                    self._idle_since = time.monotonic()
                    self._last_pass_s = self._idle_since - t0

    def _wait_and_pick(self) -> list[TreeJob]:
        """The next batch (``self._cond`` held, the queue not empty): after the window, or
        at once when every request computing on the pair is queued."""
        start = time.monotonic()
        cap = self.settings.max_batch
        self._cond.wait_for(lambda: len(self._queue) >= min(self._active, cap), self.settings.window_s)
        # Answers between passes (waiting for the remote) come back soon when the remote is
        # fast: worth a wait of a fraction of a pass while the batch has room, so that token-by-
        # token streams run as one batch instead of alternating halves.
        follow = min(self.FOLLOW_MAX_S, self.FOLLOW_FRACTION * self._last_pass_s)
        self._cond.wait_for(
            lambda: (
                len(self._queue) >= min(self._streams, cap)
                or sum(len(j.ids) for j in self._queue) >= self.settings.max_tokens
            ),
            start + follow - time.monotonic(),
        )
        return self._pick()

    def _pick(self) -> list[TreeJob]:
        first = self._queue[0]
        chosen, width = [first], len(first.ids)
        for job in sorted(self._queue[1:], key=lambda j: abs(len(j.ids) - len(first.ids))):
            if len(chosen) == self.settings.max_batch:
                break
            grown = max(width, len(job.ids))
            if grown * (len(chosen) + 1) <= self.settings.max_tokens:
                chosen.append(job)
                width = grown
        taken = {id(j) for j in chosen}
        self._queue = [j for j in self._queue if id(j) not in taken]
        return chosen

    def _run(self, batch: list[TreeJob]) -> None:
        try:
            try:
                results = compute.run(self.pair.forward_trees, batch)
            except Exception:
                if len(batch) == 1:
                    raise
                log.exception("a batched pass of %d trees failed; running them one by one", len(batch))
                for job in batch:
                    self._run([job])
                return
            for job, rows in zip(batch, results, strict=True):
                job.result = rows
            self.passes += 1
            self.jobs += len(batch)
        except BaseException as exc:  # noqa: BLE001 (handed to the waiting request, which raises it)
            for job in batch:
                job.error = exc
        finally:
            for job in batch:
                if job.result is None and job.error is None:
                    job.error = RuntimeError("the pair's batched pass ended without a result")
                job.done.set()
