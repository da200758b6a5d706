"""The engine process's CPU thread count: from the cores it can actually get (its CPU
affinity and its cgroup's CPU quota), less the HTTP process's share; OMP_NUM_THREADS wins."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from pagoda.logger import get_logger
from pagoda.process import affinity_cores

logger = get_logger(__name__)

HTTP_PROCESS_CORES = 1  # kept for the HTTP process (tokenizing, detokenizing, streaming)
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class CpuBudget:
    """What this process may use: cores in its affinity mask and its cgroup's quota."""

    affinity: int
    quota: float | None  # CPUs' worth of time per period; None when unlimited

    @property
    def usable(self) -> int:
        cores = self.affinity
        if self.quota is not None:
            cores = min(cores, max(1, math.ceil(self.quota)))
        return max(1, cores)

    def engine_threads(self, http_cores: int = HTTP_PROCESS_CORES) -> int:
        """Threads for the engine: the usable cores less the HTTP process's, at least 1."""
        return max(1, self.usable - http_cores)


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
                 ) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup path, v2 or v1."""
    quotas = [q for q in (_v2_quota(root, proc_cgroup), _v1_quota(root)) if q is not None]
    return min(quotas) if quotas else None


def _v2_quota(root: Path, proc_cgroup: Path) -> float | None:
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    found = []
    folder = root / path.lstrip("/")
    while True:
        found.append(_read_cpu_max(folder / "cpu.max"))
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    quotas = [q for q in found if q is not None]
    return min(quotas) if quotas else None


def _read_cpu_max(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def _v1_quota(root: Path) -> float | None:
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def configure_cpu_threads() -> int:
    """Set torch's intra-op threads for the engine process and log why; returns the count."""
    import torch
    budget = CpuBudget(affinity_cores(), cgroup_quota())
    quota = "none" if budget.quota is None else f"{budget.quota:g} CPUs"
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        threads, why = int(given), "from OMP_NUM_THREADS"
    else:
        threads = budget.engine_threads()
        why = f"{budget.usable} usable, {HTTP_PROCESS_CORES} kept for the HTTP process"
    torch.set_num_threads(threads)
    logger.info("engine CPU threads: %d (%s; affinity %d cores, cgroup quota %s)",
                threads, why, budget.affinity, quota)
    return threads
