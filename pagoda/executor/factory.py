"""Which executor an engine gets for its config."""

from __future__ import annotations

from pagoda.executor.base import Executor, WorkerConfig
from pagoda.executor.in_process import InProcessExecutor
from pagoda.models.source import ModelSource


def executor_for(config: WorkerConfig, source: ModelSource | None = None) -> Executor:
    """The executor for this config: one worker in this process (the only kind so far).
    `source`: the model as the caller already resolved it, so it is not resolved twice."""
    return InProcessExecutor(config, source)
