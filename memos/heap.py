"""The process heap (glibc malloc): fewer arenas, and freed memory handed back to the system.

Why: the daemon allocates from many threads (a thread per generation, the server's worker
pool, the embedder's lanes, build workers), and torch tensors, ONNX buffers and request data
all come from malloc. glibc gives threads arenas of their own (up to 8 per core) and keeps what
is freed in each for reuse, so after a burst of large, short-lived allocations (a generation's
full-precision cache is tens of MB) every arena keeps its peak and RSS grows long after the
memory is free (measured with the soak: docs/benchmarks.md, "Soak").

`limit_arenas(n)` caps the number of arenas (mallopt M_ARENA_MAX; call it before the worker
threads start) and `Trimmer` calls malloc_trim(0) every `interval_s` on a thread of its own,
which gives the free pages of every arena back to the system. Both are no-ops where the C
library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

log = logging.getLogger("memos.heap")

_M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.malloc_trim  # noqa: B018
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def available() -> bool:
    return _LIBC is not None


def limit_arenas(count: int) -> bool:
    """At most `count` malloc arenas from now on (0: leave glibc's default); whether set."""
    if _LIBC is None or count <= 0:
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, count))


def trim() -> bool:
    """Give the free memory of every arena back to the system; whether any was."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


class Trimmer:
    """A thread that trims the heap every `interval_s` seconds until `stop()`."""

    def __init__(self, interval_s: float) -> None:
        assert interval_s > 0, "an interval in seconds"
        self.interval_s = interval_s
        self.runs = 0
        self.last_ms = 0.0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memos-heap-trim", daemon=True)

    def start(self) -> None:
        if available():
            self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            started = time.perf_counter()
            trim()
            self.last_ms = (time.perf_counter() - started) * 1000
            self.runs += 1

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
