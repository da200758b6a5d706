"""Launching pagoda's Triton kernels, or compiling them ahead, many at once.

Triton compiles a kernel for each new specialization (argument dtypes, alignments, integer
divisibility, constexprs) at its first launch, one after another. An engine's startup meets
about a dozen such variants in its memory-profile step and CUDA-graph warm-ups: 5 s on an H200
with an empty Triton cache. Inside `compile_ahead(run)`, every `launch` made by `run` only
hands its variant to Triton's async compile mode, which builds them all on a thread pool; the
real forwards that follow find them compiled.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pagoda.logger import get_logger

logger = get_logger(__name__)

MAX_COMPILE_THREADS = 8


class _Ahead(threading.local):
    """The launches seen so far while compiling ahead on this thread; None: launch for real."""

    seen: set | None = None


_ahead = _Ahead()


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """kernel[grid](*args, **kwargs), or inside compile_ahead() its compile only."""
    seen = _ahead.seen
    if seen is None:
        kernel[grid](*args, **kwargs)
        return
    key = (kernel, tuple(_variant(a) for a in args), tuple(sorted(kwargs.items())))
    if key not in seen:  # the same call for every layer: submitted once
        seen.add(key)
        kernel.warmup(*args, grid=grid, **kwargs)


def _variant(arg: Any) -> Any:
    """What of an argument can select a compiled variant (a tensor: its dtype and alignment);
    numbers are kept whole, which only ever tells more variants apart than Triton does."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16
    return arg


def can_compile_ahead() -> bool:
    """Triton's async compile mode exists (triton >= 3.5), and kernels really compile."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.runtime import _async_compile  # noqa: F401
    except ImportError:
        return False
    return True


def compile_ahead(run: Callable[[], None], threads: int | None = None) -> None:
    """Call `run` with every launch() turned into a compile on `threads` workers, and return
    once all have finished. `run`'s own device work still runs, on kernels' unwritten
    outputs: it must not depend on their values. A failed compile is left to the real launch
    to raise."""
    from triton.runtime._async_compile import AsyncCompileMode

    threads = threads or min(MAX_COMPILE_THREADS, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool:
        _ahead.seen = set()
        try:
            with AsyncCompileMode(pool, ignore_errors=True):
                run()
        finally:
            logger.debug("compiled %d Triton launch variants ahead", len(_ahead.seen))
            _ahead.seen = None
