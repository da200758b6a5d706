"""The executor interface EngineCore drives, and the plain data that crosses it.

An executor owns the workers that hold the model: one in this process today, one process per
tensor-parallel rank later. So every argument and result below is data (config dataclasses,
a SchedulerOutput, ints, an int32 bitmask), never a callable or a live object, and each call
can become one message to the workers.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagoda.config import EngineConfig
from pagoda.lora.request import LoRARequest
from pagoda.scheduler.output import ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class WorkerConfig:
    """What a worker needs to load and run the model."""

    engine: EngineConfig
    max_model_len: int  # resolved by the core from the model's config and the engine's


@dataclass(slots=True)
class LoadedModelInfo:
    """What the workers report once the model is loaded."""

    device: str  # "cpu", "cuda:0"
    dtype: str  # torch's name: "float32", "bfloat16"
    attention_backend: str
    weight_bytes: int
    num_parameters: int  # the checkpoint's (the whole model's, however it is held)
    kv_cache_dtype: str = "auto"  # --kv-cache-dtype as held ("auto" resolved by the checkpoint)
    expert_weight_bytes: int = 0  # of weight_bytes, a mixture of experts' routed experts'


@dataclass(slots=True)
class KVCacheSizing:
    """How many KV blocks the memory budget buys, and what sizing measured on the way."""

    num_blocks: int  # the null block included
    activation_bytes: int = 0  # profiled step peak above the weights (GPU); 0 where unmeasured
    windows: tuple[int | None, ...] = (None,)  # each KV group's sliding window, group 0 first


class Executor(abc.ABC):
    """Runs the model for EngineCore: start-up, one step at a time, sleep and wake.

    A step is execute_model() (queue the forward pass), sample_tokens() (queue sampling, with
    the grammar bitmask the core filled meanwhile), and later collect_output(), which waits
    for the oldest step not yet collected: one step may stay in flight while the next one is
    executed.
    """

    @property
    @abc.abstractmethod
    def loaded_model(self) -> LoadedModelInfo:
        """Facts about the loaded model (after load_model())."""

    @abc.abstractmethod
    def init_device(self) -> None:
        """Pick the device(s) and create their contexts."""

    @abc.abstractmethod
    def load_model(self) -> LoadedModelInfo:
        """Load the weights and build the model runner(s)."""

    @abc.abstractmethod
    def determine_kv_cache_size(self) -> KVCacheSizing:
        """Profile if needed and size the KV cache (the smallest over all workers)."""

    @abc.abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> int:
        """Allocate the KV cache; returns its bytes on one device."""

    @abc.abstractmethod
    def capture_decode_graphs(self) -> bool:
        """Capture decode steps where the device and backend allow; returns whether it did."""

    @abc.abstractmethod
    def execute_model(self, sched_out: SchedulerOutput) -> None:
        """Queue one step's forward pass; sample_tokens() must follow before the next one."""

    @abc.abstractmethod
    def sample_tokens(self, grammar_bitmask: torch.Tensor | None) -> None:
        """Queue the sampling of the step executed last. grammar_bitmask: int32 [rows,
        ceil(vocab/32)] on the host (bit set = allowed), one row per grammar_rows entry."""

    @abc.abstractmethod
    def collect_output(self) -> ModelRunnerOutput:
        """Wait for the oldest uncollected step and return what it produced."""

    @abc.abstractmethod
    def add_lora(self, request: LoRARequest) -> int:
        """Read and check a LoRA adapter on every worker (LoRAAdapterError if it does not
        fit the model); returns its host bytes."""

    @abc.abstractmethod
    def remove_lora(self, lora_id: int) -> None:
        """Forget an adapter once the workers' live requests are done with it."""

    @abc.abstractmethod
    def sleep(self) -> None:
        """Free the KV cache and move the weights to host memory (no step in flight)."""

    @abc.abstractmethod
    def wake_up(self) -> bool:
        """Undo sleep(); returns whether CUDA graphs had to be captured again."""

    @abc.abstractmethod
    def prepare_sleep(self) -> bool:
        """Make the weights' host copy now; returns whether there was anything to copy."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the workers and let go of their memory."""
