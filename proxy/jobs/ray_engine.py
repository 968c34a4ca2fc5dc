"""The distributed engine of the offline commands (``--engine ray``): Ray Data over the lines
still to answer, one worker per actor, each with its own served model (remote adapter and
local pair), loaded once.

The driver (the ``deltaproxy batch``/``redact``/``audit`` process) keeps everything that makes
a run resumable and its output the same as a single-process run's: it parses the input,
opens the output (:class:`proxy.jobs.runner.LineRunner`: the lines already answered are
skipped), answers the lines that need no model (bad lines) itself, and appends every line
that comes back from the workers with one ``write``, as the local engine does. Workers
answer each line with the same function the local engine calls
(:class:`LineWorker.answer`), so a line's answer does not depend on the engine; only the
order of the lines in the file does (both engines write lines as they finish).

What crosses the process boundary is JSON text (one ``payload`` column in, one ``line``
column out), so Arrow never has to infer a schema from request bodies that differ from
line to line.

Ray's own API: Ray Data ``Dataset.map_batches`` with a callable class and an actor pool
(``ActorPoolStrategy(size=workers)``), ``Dataset.iter_rows`` to stream results back
(https://docs.ray.io/en/latest/data/api/doc/ray.data.Dataset.map_batches.html).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.common.jsontext import json_text


class LineWorker(Protocol):
    """What a Ray worker holds: one served model and what answering a line needs."""

    async def answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The output line for one input payload (never raises for a bad line: the error
        goes into the line, as in the local engine)."""
        ...

    async def aclose(self) -> None: ...


WorkerFactory = Callable[[], LineWorker]
"""Builds a worker inside the Ray actor; must pickle (a module-level class or function,
or a :func:`functools.partial` of one, over plain data such as the config as JSON)."""


class EngineError(RuntimeError):
    """Ray cannot run the job: not installed, no cluster at the address, a worker that
    cannot start (the message says which and why)."""


@dataclass(frozen=True)
class RaySettings:
    """How the Ray engine runs.

    ``address``: a running cluster (``ray://host:10001`` or ``host:6379``); ``None`` uses
    ``$RAY_ADDRESS`` when set, else starts a local cluster for this run and stops it after.
    ``workers``: actors, each with its own served model (its own pair in memory).
    ``concurrency``: lines in flight at once in one worker (requests to the remote; the
    pair's steps run one at a time in each worker).
    ``cpus_per_worker``: CPUs Ray reserves per actor (torch's threads in that actor).
    """

    address: str | None = None
    workers: int = 2
    concurrency: int = 4
    cpus_per_worker: float = 1.0

    def check(self) -> None:
        """Raises:
        ValueError: a count below 1 or CPUs ≤ 0."""
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1 (got {self.workers})")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1 (got {self.concurrency})")
        if not self.cpus_per_worker > 0:
            raise ValueError("--cpus-per-worker must be above 0")


class _Actor:
    """A Ray Data callable class: builds its :class:`LineWorker` once, then answers each
    batch of payloads concurrently on its own event loop (kept for the actor's life, so the
    worker's HTTP clients stay bound to one loop)."""

    def __init__(self, factory: WorkerFactory, concurrency: int) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.worker = factory()
        except Exception as exc:
            # Ray hands the driver this error as text only: mark the line that says what failed.
            raise RuntimeError(f"{_MARK}the worker could not start: {_summary(exc)}") from None
        self.gate = asyncio.Semaphore(concurrency)

    async def _one(self, payload: str) -> str:
        async with self.gate:
            return json_text(await self.worker.answer(json.loads(payload)))

    async def _all(self, payloads: Iterable[str]) -> list[str]:
        return list(await asyncio.gather(*(self._one(str(p)) for p in payloads)))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        try:
            return {"line": self.loop.run_until_complete(self._all(batch["payload"]))}
        except Exception as exc:
            raise RuntimeError(f"{_MARK}a line failed in the worker: {_summary(exc)}") from None

    def __del__(self) -> None:
        try:
            self.loop.run_until_complete(self.worker.aclose())
            self.loop.close()
        except Exception:  # noqa: BLE001, S110 - the actor is going away; nothing to tell
            pass


CONNECT_TIMEOUT_S = 10.0
"""How long :func:`check_reachable` waits for a cluster's address to accept a connection."""


def cluster_address(settings: RaySettings) -> str | None:
    """The cluster to connect to: ``settings.address``, else ``$RAY_ADDRESS``; ``None``
    starts a local one."""
    return settings.address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(settings: RaySettings) -> None:
    """Fail fast when Ray is missing, a named cluster's address accepts no connection (Ray
    itself retries for minutes), or a local cluster has fewer CPUs than one worker asks for
    (Ray would wait for ever). ``auto`` is left to Ray.

    Raises:
        EngineError: Ray is not installed, the address is malformed or unreachable within
            :data:`CONNECT_TIMEOUT_S`, or ``cpus_per_worker`` exceeds this machine's CPUs.
    """
    import importlib.util
    import socket

    if importlib.util.find_spec("ray") is None:
        raise EngineError("--engine ray needs Ray Data: pip install 'deltaproxy[ray]' (ray[data])")
    address = cluster_address(settings)
    if address is None or address == "local":
        cpus = os.cpu_count() or 1
        if settings.cpus_per_worker > cpus:
            raise EngineError(
                f"--cpus-per-worker {settings.cpus_per_worker:g}: a local Ray cluster has {cpus} CPUs, "
                "so no worker could start"
            )
        return
    if address == "auto":
        return
    named = "--ray-address" if settings.address else "$RAY_ADDRESS"
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EngineError(f"{named} {address!r} is not host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise EngineError(f"--engine ray: no Ray cluster answers at {address} ({exc})") from exc


def connect(settings: RaySettings) -> bool:
    """Connect to the cluster (or start a local one); True when this call started it (then
    :func:`disconnect` stops it). Call it from the main thread (Ray sets its signal
    handlers there).

    Raises:
        EngineError: Ray is missing or no cluster answers at the address.
    """
    check_reachable(settings)
    # Ray starts a cluster by itself when its API is used unconnected: after an interrupt has
    # stopped the cluster, the thread still reading results would start a new one.
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    import ray
    import ray.data  # configures its own logging on import: the level below must come after

    # Ray Data's progress lines and a failed worker's traceback go to Ray's log files
    # (``/tmp/ray/session_latest/logs``); the command says in one line what failed
    # (:class:`EngineError`).
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    if ray.is_initialized():
        return False
    address = cluster_address(settings)
    try:
        ray.init(
            address=address,
            logging_level=logging.ERROR,
            log_to_driver=False,
            include_dashboard=False if address is None else None,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EngineError(f"--engine ray: cannot reach a Ray cluster at {address}: {exc}") from exc
    if threading.current_thread() is threading.main_thread():
        # Ray's driver handler exits with status 15; a terminated command exits 143 (128 + 15),
        # its output closed and the cluster stopped on the way out.
        signal.signal(signal.SIGTERM, _terminated)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return True


def answer_all(
    payloads: list[dict[str, Any]],
    factory: WorkerFactory,
    settings: RaySettings,
    write: Callable[[dict[str, Any]], None],
    stop: threading.Event | None = None,
) -> None:
    """Answer ``payloads`` on the Ray cluster that :func:`connect` joined and call ``write``
    with each output line as it comes back (in the calling thread; in the order batches
    finish); once ``stop`` is set, no more lines.

    Each batch holds ``settings.concurrency`` payloads, so at most ``workers × concurrency``
    answered lines are lost when the driver is killed; the output file (the driver's
    ``write``) is the record of what is done.

    Raises:
        EngineError: not connected, no node can run a worker, or a worker failed (its
            error named).
        ValueError: bad settings.
    """
    settings.check()
    if not payloads:
        return
    import ray

    if not ray.is_initialized():  # never connect here: after an interrupt that would start a new cluster
        raise EngineError("--engine ray: not connected to a Ray cluster (connect() first)")
    try:
        largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
        if settings.cpus_per_worker > largest:
            # Ray would wait for such a node for ever.
            raise EngineError(
                f"--cpus-per-worker {settings.cpus_per_worker:g}: no node of the Ray cluster has that many CPUs "
                f"(the largest has {largest:g})"
            )
        ds = ray.data.from_items(
            [{"payload": json_text(p)} for p in payloads],
            override_num_blocks=max(1, min(len(payloads), settings.workers * 4)),
        )
        out = ds.map_batches(
            _Actor,
            fn_constructor_kwargs={"factory": factory, "concurrency": settings.concurrency},
            batch_size=settings.concurrency,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=settings.workers),
            num_cpus=settings.cpus_per_worker,
        )
        rows = out.iter_rows()
        try:
            for row in rows:
                write(json.loads(row["line"]))
                if stop is not None and stop.is_set():
                    break
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()
    except ray.exceptions.RayError as exc:
        if stop is not None and stop.is_set():
            return  # the run was stopped and the cluster with it: nothing to tell
        raise EngineError(f"--engine ray: a worker failed: {_cause(exc)}") from exc


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def disconnect(started: bool) -> None:
    """Stop the local cluster that :func:`connect` started (``started``); else nothing."""
    if started:
        import ray

        ray.shutdown()


_MARK = "deltaproxy worker: "


def _summary(exc: BaseException) -> str:
    """An error on one line: its type and message, less pydantic's "further information" links."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip() and "further information" not in x]
    return f"{type(exc).__name__}: {' '.join(lines)}"[:600]


def _cause(exc: BaseException) -> str:
    """What a worker said failed (the :data:`_MARK` line of the traceback text that Ray passes
    on), else the last line of that text."""
    text = str(exc)
    at = text.rfind(_MARK)
    if at >= 0:
        return text[at + len(_MARK) :].splitlines()[0]
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
