"""Which executor an engine gets for its config."""

from __future__ import annotations

from pagoda.executor.base import Executor, WorkerConfig
from pagoda.models.source import ModelSource


def executor_for(config: WorkerConfig, source: ModelSource | None = None) -> Executor:
    """The executor for this config: one worker in this process (backend `uni`), one
    worker process per rank (`mp`, the default with more than one rank), or one Ray actor
    per rank on a running Ray cluster (`ray`, across nodes). `source`: the
    model as the caller already resolved it, so that an in-process worker does not resolve
    it twice (worker processes resolve it themselves)."""
    backend = config.engine.parallel.backend
    if backend == "ray":
        from pagoda.executor.ray_executor import RayExecutor
        return RayExecutor(config)
    if backend == "mp":
        from pagoda.executor.multiproc import MultiprocExecutor
        return MultiprocExecutor(config)
    from pagoda.executor.in_process import InProcessExecutor
    return InProcessExecutor(config, source)
