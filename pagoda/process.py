"""Process-wide settings and startup timing for pagoda's long-running processes."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator

# Net allocations between two collections of the youngest generation in a serving process.
# At CPython's 700 the API process collected every ~100 streamed tokens, about 1.5 ms each
# whatever it found: 14 % of its CPU with 256 streams. At 10,000 the same run collected 11
# times instead of 672, and the process used 10 % less CPU.
YOUNG_GC_THRESHOLD = 10_000


def freeze_startup_objects() -> None:
    """Move everything alive now (model, CUDA graphs, imported libraries: hundreds of
    thousands of objects) out of the garbage collector's reach, and collect the youngest
    generation less often (YOUNG_GC_THRESHOLD). Full passes scan every tracked object, and in
    a step loop that allocates steadily they otherwise pause the process for a tenth of a
    second or more every few seconds. Only for processes that keep what they built at
    startup: a frozen object that later becomes cyclic garbage is never reclaimed."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)


@contextlib.contextmanager
def existing_objects_frozen() -> Iterator[None]:
    """Within the block, everything alive on entry is out of the collector's reach (as
    freeze_startup_objects does for good), and back on exit, so nothing is kept forever:
    for a busy stretch of a process that also frees what it built (an LLM's generate call).
    Does nothing if objects are frozen already."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class StartupPhases:
    """Wall time of a process's startup, phase by phase, for a log line that says where it
    went. Wall clock (time.time), so the start may be taken in another process: the parent
    that spawned this one."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.time() if start is None else start
        self._last = self.start
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        """The phase that just ended, timed from the previous mark."""
        now = time.time()
        self.phases.append((phase, now - self._last))
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self.start

    def summary(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.phases)
        return f"{self.total:.1f}s ({parts})"


def affinity_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now ("": on every address of this machine)."""
    import socket
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
