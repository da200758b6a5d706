"""pagoda's compiled CPU kernels: C++ sources kept beside the modules that call them, compiled
with the machine's C++ compiler (`$CXX`, else g++) at first use into pagoda's home
(`$PAGODA_HOME/kernels`, else ~/.cache/pagoda/kernels), once per source, flags and compiler,
and called through ctypes. A source may have several builds (instruction-set flags, best
first); each exports `<prefix>_supported()`, which says whether this CPU runs it. The kernels
read float32 rows laid one after another (`float32_rows`).

Every call goes through `run_kernel`, which inside `recording_kernel_calls()` also notes the
call: its arguments are addresses and sizes, so calling it again reruns the kernel on the same
memory (what `pagoda.runner.cpu_plans` replays a decode step from)."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from pagoda.home import home_dir

FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"', re.MULTILINE)

KernelCall = tuple[Callable[..., Any], tuple[Any, ...]]  # a C function and its arguments
_recorded: ContextVar[list[KernelCall] | None] = ContextVar("pagoda_kernel_calls", default=None)


def run_kernel(function: Callable[..., Any], *args: Any) -> None:
    """Call a kernel's C function (it returns nothing: its results are in memory it was
    given); inside recording_kernel_calls() the call is noted too."""
    function(*args)
    calls = _recorded.get()
    if calls is not None:
        calls.append((function, args))


@contextmanager
def recording_kernel_calls() -> Iterator[list[KernelCall]]:
    """The kernel calls made inside, in order (the list fills as they run)."""
    calls: list[KernelCall] = []
    token = _recorded.set(calls)
    try:
        yield calls
    finally:
        _recorded.reset(token)


def float32_rows(x: torch.Tensor) -> torch.Tensor:
    """x itself where it is contiguous float32 (its rows then lie one after another, whatever
    its leading dims), else a contiguous float32 copy: what the CPU kernels read."""
    if x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.to(torch.float32).contiguous()


class KernelUnavailable(Exception):
    """No build of a kernel runs here; the message says why."""


def kernels_dir() -> Path:
    """Where compiled CPU kernels are kept: $PAGODA_HOME/kernels, else
    ~/.cache/pagoda/kernels."""
    return home_dir() / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _source_text(source: Path) -> str:
    """The source and the local headers it includes (`#include "name.h"`, beside it)."""
    text = source.read_text()
    headers = LOCAL_INCLUDE.findall(text)
    return "\0".join([text, *((source.parent / name).read_text() for name in headers)])


def _library_path(source: Path, compiler: str, flags: tuple[str, ...]) -> Path:
    """The library's file for this source (and its local headers), these flags and this
    compiler."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    digest = hashlib.sha256("\0".join([_source_text(source), *flags, version]).encode())
    return kernels_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def _build(source: Path, compiler: str, flags: tuple[str, ...], path: Path) -> None:
    """Compile `source` into `path` (written whole, then renamed: concurrent builds are
    safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", partial, str(source)], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _load_build(source: Path, compiler: str, flags: tuple[str, ...],
                supported: str) -> ctypes.CDLL | None:
    """One build (compiled now if missing), where this CPU runs it."""
    path = _library_path(source, compiler, flags)
    if not path.exists():
        _build(source, compiler, flags, path)
    library = ctypes.CDLL(str(path))
    return library if getattr(library, supported)() else None


def load_kernel(source: Path, builds: dict[str, tuple[str, ...]], supported: str,
                only: str | None = None) -> tuple[ctypes.CDLL, str]:
    """The first of `builds` (name -> compiler flags; or only the build `only`) that compiles
    and that this CPU runs (its exported function `supported` says so), and its name.
    Raises KernelUnavailable when there is none."""
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailable("no C++ compiler (g++ or $CXX)")
    failures = []
    for name in [only] if only is not None else builds:
        try:
            library = _load_build(source, compiler, FLAGS + builds[name], supported)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", None) or error
            failures.append(f"the {name} build did not compile: {str(detail).strip()[:300]}")
            continue
        if library is not None:
            return library, name
        failures.append(f"this CPU does not run the {name} build")
    raise KernelUnavailable("; ".join(failures))


def load_chosen_kernel(variable: str, source: Path, builds: dict[str, tuple[str, ...]],
                       supported: str, what: str, instead: str,
                       logger: logging.Logger) -> ctypes.CDLL | None:
    """The build the environment variable `variable` picks (0: none; a build's name: that
    build; else the best that runs here), logging on `logger` which build `what` is, or why
    there is none and what runs `instead`."""
    choice = os.environ.get(variable, "auto")
    if choice == "0":
        return None
    try:
        library, build = load_kernel(source, builds, supported,
                                     choice if choice in builds else None)
    except KernelUnavailable as why:
        logger.info("no %s (%s): %s", what, why, instead)
        return None
    logger.info("%s: the %s build", what, build)
    return library
