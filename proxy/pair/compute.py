"""The one thread of a process that runs the local pairs' forward passes with torch's
intra-op threads: :func:`run`. The pairs' other threads (a thread per request in flight,
each pair's batcher) run torch single-threaded (:func:`single_threaded`).

torch's CPU kernels parallelise through OpenMP, and OpenMP keeps a team of worker threads
per thread that has run a parallel region. Once a process holds more such threads than it
has cores, GNU OpenMP stops letting a team's workers spin between regions and puts them to
sleep instead, so that each of the thousand small parallel regions of a one-token pass
waits for a wake-up: on 2 cores a one-token pass of U and B (SmolLM2, float32) took
112 ms on a worker thread of a process whose main thread had run one forward pass, 70 ms
single-threaded, and 57 ms with 2 threads where no other thread had a team; 32 one-token
rows 551, 268 and 224 ms; 2 rows of 96 tokens 443, 607 and 374 ms. The pairs' passes
therefore all run on this one thread, with as many intra-op threads as the process may
use cores; no other pair thread forms a team.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_ident: int | None = None


def threads() -> int:
    """The compute thread's intra-op threads: the cores this process may run on
    (``sched_getaffinity``; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def single_threaded() -> None:
    """Run torch on the calling thread without intra-op threads (OpenMP's thread count and
    MKL's are per thread: other threads keep theirs). A pair thread's initializer."""
    import torch  # here: importing the batcher does not load torch

    torch.set_num_threads(1)


def _start() -> None:
    global _ident
    import torch

    _ident = threading.get_ident()
    torch.set_num_threads(threads())


def executor() -> ThreadPoolExecutor:
    """The compute thread, as an executor: what an in-process remote (llama.cpp, transformers)
    runs its blocking calls on, so that its intra-op threads are this thread's team too
    (llama.cpp links the same OpenMP runtime as torch)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="pair-compute", initializer=_start)
        return _executor


def run(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the compute thread (at once where called from it), its result or its
    exception. ``fn`` must not wait for another thread that waits for the compute thread:
    take a pair's lock inside ``fn``, not around this call."""
    if threading.get_ident() == _ident:
        return fn(*args)
    return executor().submit(fn, *args).result()
