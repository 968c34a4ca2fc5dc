"""deltaproxy: offset unlearning (δ-unlearning, arXiv 2404.11045) for black-box LLMs, as an OpenAI-compatible proxy."""

import ctypes
import functools
import os

__version__ = "0.1.0"

MALLOC_ARENAS = 2
"""glibc malloc arenas for a process that imports deltaproxy (see :func:`limit_malloc_arenas`)."""


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, for its allocator's controls; ``None`` elsewhere (another allocator has its own rules)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas at :data:`MALLOC_ARENAS` (``mallopt(3)``, ``M_ARENA_MAX``);
    not where ``MALLOC_ARENA_MAX`` is set, nor off glibc. Called when :mod:`proxy` is first
    imported: glibc fixes the cap when a second thread first needs an arena of its own, so
    later calls (once torch's threads run) change nothing.

    The local pair's rows are large (a 96-position draft is 19 MB per model) and are made
    and freed on many threads (the batcher's and one per request in flight). glibc gives
    each thread an arena, up to 8 per core, and each keeps what its threads freed: 16
    concurrent streams peaked at 1,615 MB RSS, and at 1,384 MB with 2 arenas
    (``bench.speed``'s fake-upstream part alone, 2 cores). Freed blocks are still reused
    in place, unlike a fixed ``M_MMAP_THRESHOLD``, which maps and faults every large block
    anew.
    """
    libc = _glibc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX


limit_malloc_arenas()


def release_free_memory() -> None:
    """Give the memory that glibc malloc holds freed back to the system (``malloc_trim(3)``;
    nothing off glibc). A few milliseconds with the pair's heap, so
    :class:`proxy.pair.batcher.TreeBatcher` calls it once the pair has been idle a while, never
    between a stream's calls."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
