"""Give freed heap memory back to the system while the app serves.

Under load, glibc's allocator keeps memory that requests freed (image buffers, tensors of varying
shapes, Gradio's payloads, across many worker threads) and reuses it only partly, so the resident
size of a busy server creeps up although nothing leaks: measured with the load test, 8 clients,
about +5 MB a minute after the warm-up, with no growth of Python objects (tracemalloc). Calling
`malloc_trim(0)` every few seconds returns the free pages; the same run then stays flat
(benchmarks/results/load_test.md). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger(__name__)

TRIM_INTERVAL_S = 20.0


def start_heap_trimmer(interval_s: float = TRIM_INTERVAL_S) -> threading.Thread | None:
    """A daemon thread calling glibc's malloc_trim(0) every `interval_s` seconds (None off glibc)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        log.info("No glibc malloc_trim here: freed heap memory stays with the process.")
        return None
    trim.argtypes = [ctypes.c_size_t]
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            trim(0)

    thread = threading.Thread(target=run, name="heap-trimmer", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread
