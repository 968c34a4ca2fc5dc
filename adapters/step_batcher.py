"""Concurrent requests' decoding steps run as one batch per pass (continuous batching), for
in-process remotes: :class:`StepBatcher`.

An in-process remote drafts one token per forward pass. Run one request at a time, 16
concurrent drafts cost 16 one-row passes per token each; one pass of 16 one-token rows
reads the weights once and costs about 3× one row's pass (SmolLM2-135M, 2 cores: 68 ms for
one row, 215 ms for 16; ``bench.audit_speed`` measures what it saves an audit).
Each drafting coroutine awaits :meth:`StepBatcher.submit` with its next step; the batcher
runs every step waiting when the previous pass ends (up to ``max_batch``) in one call of
``run_batch`` on the executor, and the coroutines woken by a pass bring their next steps
before the next one is formed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")


class StepBatcher(Generic[J, R]):
    """Jobs of type ``J`` submitted by the coroutines of one event loop, run in batches by
    ``run_batch(jobs)`` on ``executor`` (None: asyncio's default), which returns one result
    per job, in order: an ``R``, or an exception that only that job raises. An exception
    ``run_batch`` raises fails every job of its batch. A job whose coroutine is cancelled
    before its batch starts is left out of it."""

    def __init__(
        self,
        run_batch: Callable[[list[J]], Sequence[R | BaseException]],
        executor: Executor | None,
        *,
        max_batch: int,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be ≥ 1")
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch = max_batch
        self._pending: list[tuple[J, asyncio.Future[R]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        """Passes run (for benchmarks and tests)."""
        self.jobs = 0
        """Jobs run in them."""

    async def submit(self, job: J) -> R:
        """``job``'s result, run in the next batch that has room.

        Raises:
            BaseException: the job's own exception, or the one its batch raised.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (another asyncio.run): nothing of the old one carries over
            self._loop, self._pending, self._task = loop, [], None
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((job, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            await self._batches()
        except asyncio.CancelledError:  # the loop is closing: nothing waiting may hang
            for _, f in self._pending:
                f.cancel()
            self._pending = []
            raise

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            # One turn of the loop: the coroutines that the last pass woke bring their next steps.
            await asyncio.sleep(0)
            batch = [(j, f) for j, f in self._pending[: self.max_batch] if not f.done()]
            del self._pending[: self.max_batch]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [j for j, _ in batch])
            except asyncio.CancelledError:
                for _, f in batch:
                    f.cancel()
                raise
            except Exception as exc:  # handed to every job of the batch
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.jobs += len(batch)
            for (_, f), r in zip(batch, results, strict=True):
                if f.done():
                    continue
                if isinstance(r, BaseException):
                    f.set_exception(r)
                else:
                    f.set_result(r)
