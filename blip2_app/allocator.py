"""glibc's allocator, tuned so resident memory follows what the model really holds.

While loading (`tune_allocator()`, called first by `load_engine`): tensors of 1 MB and more are
mmapped (freed at once, instead of glibc raising its mmap threshold to 32 MB after the first big
free and then keeping every freed block of that size), free heap tops over 1 MB are returned, and
at most two malloc arenas exist (each thread otherwise gets its own, each keeping its own free
blocks). Measured on the real-size blip2-opt-2.7b + blip2-itm-vit-g in dynamic-int8: peak
anonymous memory 4.61 -> 4.18 GiB while loading (benchmarks/results/memory_phases.md).

Once loaded (`tune_allocator(serving=True)`, the end of `load_engine`): the mmap threshold goes
up to glibc's own ceiling, 32 MB. Activations are 1-10 MB each (ViT-g, beam search); mmapped,
every one costs fresh zeroed pages: kept at 1 MB, the chat turn's peak drops 4.54 -> 4.43 GiB but
a 5-beam caption takes 9.5 instead of 6.5 s and a chat turn 13.5 instead of 9.7 s (4 MB: in
between); the heap trimmer below returns what the larger threshold keeps.

While the app serves (`start_heap_trimmer`):

Under load, glibc's allocator keeps memory that requests freed (image buffers, tensors of varying
shapes, Gradio's payloads, across many worker threads) and reuses it only partly, so the resident
size of a busy server creeps up although nothing leaks: measured with the load test, 8 clients,
about +5 MB a minute after the warm-up, with no growth of Python objects (tracemalloc). Calling
`malloc_trim(0)` every few seconds returns the free pages; the same run then stays flat
(benchmarks/results/load_test.md). Elsewhere than glibc all of this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_INTERVAL_S = 20.0
# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD_BYTES = 1 << 20
SERVING_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 20
ARENA_MAX = 2


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both)
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator(serving: bool = False) -> bool:
    """The loading settings above, or with `serving` the threshold for running the model. Again
    is harmless. False off glibc."""
    libc = _libc()
    if libc is None:
        return False
    for parameter, value in (
        (M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD_BYTES if serving else MMAP_THRESHOLD_BYTES),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_ARENA_MAX, ARENA_MAX),
    ):
        libc.mallopt(parameter, value)
    return True


def trim_heap() -> None:
    """Return free heap pages to the system now (after loading, for instance)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class HeapTrimmer(threading.Thread):
    """A daemon thread calling `trim(0)` (glibc's malloc_trim) every `interval_s` seconds until
    `stop` is set."""

    def __init__(self, trim: Callable[[int], object], interval_s: float) -> None:
        super().__init__(name="heap-trimmer", daemon=True)
        self.trim, self.interval_s = trim, interval_s
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.trim(0)


def start_heap_trimmer(interval_s: float = TRIM_INTERVAL_S) -> HeapTrimmer | None:
    """A started `HeapTrimmer` (None off glibc)."""
    libc = _libc()
    if libc is None:
        log.info("No glibc malloc_trim here: freed heap memory stays with the process.")
        return None
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    thread = HeapTrimmer(trim, interval_s)
    thread.start()
    return thread
