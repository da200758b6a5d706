"""InProcessExecutor: one Worker in the engine core's own process, called directly."""

from __future__ import annotations

import torch

from pagoda.executor.base import Executor, KVCacheSizing, LoadedModelInfo, WorkerConfig
from pagoda.executor.worker import Worker
from pagoda.lora.request import LoRARequest
from pagoda.models.source import ModelSource
from pagoda.scheduler.output import ModelRunnerOutput, SchedulerOutput


class InProcessExecutor(Executor):
    """The executor of a single-device engine: every call goes straight to its one worker."""

    def __init__(self, config: WorkerConfig, source: ModelSource | None = None) -> None:
        self.worker = Worker(config, source)

    @property
    def loaded_model(self) -> LoadedModelInfo:
        if self.worker.info is None:
            raise RuntimeError("the model is not loaded yet")
        return self.worker.info

    def init_device(self) -> None:
        self.worker.init_device()

    def load_model(self) -> LoadedModelInfo:
        return self.worker.load_model()

    def determine_kv_cache_size(self) -> KVCacheSizing:
        return self.worker.determine_kv_cache_size()

    def initialize_kv_cache(self, num_blocks: int) -> int:
        return self.worker.initialize_kv_cache(num_blocks)

    def capture_decode_graphs(self) -> bool:
        return self.worker.capture_decode_graphs()

    def execute_model(self, sched_out: SchedulerOutput) -> None:
        self.worker.execute_model(sched_out)

    def sample_tokens(self, grammar_bitmask: torch.Tensor | None) -> None:
        self.worker.sample_tokens(grammar_bitmask)

    def collect_output(self) -> ModelRunnerOutput:
        return self.worker.collect_output()

    def add_lora(self, request: LoRARequest) -> int:
        return self.worker.add_lora(request)

    def remove_lora(self, lora_id: int) -> None:
        self.worker.remove_lora(lora_id)

    def sleep(self) -> None:
        self.worker.sleep()

    def wake_up(self) -> bool:
        return self.worker.wake_up()

    def prepare_sleep(self) -> bool:
        return self.worker.prepare_sleep()

    def shutdown(self) -> None:
        self.worker.shutdown()
