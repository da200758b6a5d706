"""Process-wide settings for pagoda's long-running processes."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze_startup_objects() -> None:
    """Move everything alive now (model, CUDA graphs, imported libraries: hundreds of
    thousands of objects) out of the garbage collector's reach. Its full passes scan every
    tracked object, and in a step loop that allocates steadily they otherwise pause the
    process for a tenth of a second or more every few seconds. Only for processes that keep
    what they built at startup: a frozen object that later becomes cyclic garbage is never
    reclaimed."""
    gc.collect()
    gc.freeze()


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
