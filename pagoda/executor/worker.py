"""Worker: one device's share of the engine: the device, the model's weights and the
ModelRunner that runs them, with the steps it has launched but not yet handed back."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import torch

from pagoda.config import resolve_device, resolve_dtype
from pagoda.executor.base import KVCacheSizing, LoadedModelInfo, WorkerConfig
from pagoda.layers.attention.layer import Attention
from pagoda.layers.attention.selector import holds_e4m3_cache, select_backend
from pagoda.layers.parallel import (
    SINGLE,
    WHOLE,
    ParallelGroup,
    PipelineStage,
    layer_ranges,
)
from pagoda.logger import get_logger
from pagoda.lora.manager import LoRAManager
from pagoda.lora.request import LoRAAdapterError, LoRARequest
from pagoda.models.estimate import count_parameters
from pagoda.models.loader.checkpoint import (
    expert_weight_bytes,
    load_model,
    model_quantization,
    weight_bytes,
)
from pagoda.models.quantization import checkpoint_kv_cache_dtype, resolve_kv_cache_dtype
from pagoda.models.registry import arch_spec
from pagoda.models.source import ModelSource, resolve_model
from pagoda.runner.memory import (
    check_kv_cache_dtype,
    describe_kv_budget,
    kv_budget_bytes,
    kv_cache_torch_dtype,
    num_blocks_for,
)
from pagoda.runner.model_runner import LaunchedStep, ModelRunner, RunnerConfig
from pagoda.scheduler.output import ModelRunnerOutput, SchedulerOutput

logger = get_logger(__name__)

DISTRIBUTED_TIMEOUT_S = 600  # a collective that waits longer than this fails (a lost rank)


@dataclass(frozen=True, slots=True)
class RankSetup:
    """Where this worker sits in a group of workers: its rank of `world_size` (pipeline
    stage rank // tensor_parallel_size, tensor-parallel rank the remainder), and the address
    (`tcp://host:port`) torch.distributed's processes meet at."""

    rank: int
    world_size: int
    init_method: str
    tensor_parallel_size: int = 0  # 0: all of world_size
    # the CUDA device this rank takes; None: the configured one's index plus the rank (one
    # host's GPUs in rank order). A Ray actor sees only its own GPU: index 0.
    device_index: int | None = None

    @property
    def tp_size(self) -> int:
        return self.tensor_parallel_size or self.world_size

    @property
    def pp_size(self) -> int:
        return self.world_size // self.tp_size


class Worker:
    """Initializes its device, loads the model, and runs the ModelRunner for the executor."""

    def __init__(self, config: WorkerConfig, source: ModelSource | None = None,
                 rank: RankSetup | None = None) -> None:
        """`source`: the model already resolved by the caller (in the same process); a
        worker elsewhere resolves it from the config. `rank`: this worker's place in a
        group of worker processes (None: the only worker)."""
        self.config = config
        self.source = source or resolve_model(config.engine.model, config.engine.load_format)
        self.rank_setup = rank
        self.group: ParallelGroup = SINGLE
        self.stage: PipelineStage = WHOLE
        self.device = torch.device("cpu")
        self.runner: ModelRunner | None = None
        self.info: LoadedModelInfo | None = None
        self._launched: deque[LaunchedStep] = deque()  # launched, not yet collected

    def init_device(self) -> None:
        """Create the CUDA context now, so that its cost is timed on its own, not as part of
        the first weight copy. A worker of a group takes the device of its rank (cuda:N+rank
        where the config names cuda:N) and joins the group's torch.distributed process group
        (NCCL on CUDA, gloo on CPU)."""
        self.device = resolve_device(self.config.engine.device)
        setup = self.rank_setup
        if setup is not None and self.device.type == "cuda":  # ranks from the named GPU on
            index = setup.device_index
            self.device = torch.device(
                "cuda", (self.device.index or 0) + setup.rank if index is None else index)
        if self.device.type == "cuda":
            if self.device.index is not None:
                torch.cuda.set_device(self.device)  # kernels and graphs use the current device
            torch.empty(1, device=self.device)
        if setup is not None:
            self.group, self.stage = _join_groups(
                setup, self.device, self.source.hf_config.num_hidden_layers,
                self.config.engine.parallel.enable_expert_parallel)

    def load_model(self) -> LoadedModelInfo:
        engine, hf = self.config.engine, self.source.hf_config
        torch.manual_seed(engine.seed)
        dtype = resolve_dtype(engine.dtype, self.device, getattr(hf, "dtype", None))
        quantization = model_quantization(engine.quantization, self.source, self.device)
        # the model's parameters as its checkpoint counts them (the held tensors' elements
        # depend on how a quantized format is held, and on this rank's share), counted while
        # a GGUF's tensor index is open: loading drops it, and a count after would parse the
        # file's whole header again (its vocabulary: 2.4 s of SmolLM2's engine start on two
        # cores, 11 s of Gemma 3 270M's)
        num_parameters, _ = count_parameters(self.source, arch_spec(hf))
        model = load_model(self.source, dtype, self.device, self.config.max_model_len,
                           engine.seed, self.group, self.stage, quantization=quantization)
        self.kv_cache_dtype = self._kv_cache_dtype()
        kv_dtype = kv_cache_torch_dtype(self.kv_cache_dtype, dtype)
        check_kv_cache_dtype(kv_dtype, dtype, self.device)
        if kv_dtype.itemsize == 1:
            _log_kv_scales(model.attention_layers(), self.kv_cache_dtype)
        backend = select_backend(engine.attention_backend, self.device, kv_dtype)
        lora = None
        if engine.lora is not None:
            sched = engine.scheduler
            lora = LoRAManager(model, engine.lora, self.device, dtype,
                               max(sched.max_num_batched_tokens, sched.max_num_seqs))
        self.runner = ModelRunner(model, RunnerConfig(self.device, dtype, engine.cache.block_size,
                                                      hf.vocab_size, kv_dtype), backend, lora)
        self.info = LoadedModelInfo(str(self.device), str(dtype).removeprefix("torch."),
                                    backend.name, weight_bytes(model), num_parameters,
                                    self.kv_cache_dtype, expert_weight_bytes(model))
        return self.info

    def _kv_cache_dtype(self) -> str:
        """--kv-cache-dtype, "auto" resolved to the checkpoint's calibrated float8 cache
        where this device holds one (one log line where it does not)."""
        engine = self.config.engine
        holds = holds_e4m3_cache(engine.attention_backend, self.device)
        resolved = resolve_kv_cache_dtype(engine.cache.kv_cache_dtype, self.source, holds)
        if engine.cache.kv_cache_dtype == "auto" and checkpoint_kv_cache_dtype(self.source):
            logger.info("%s: calibrated for a float8 KV cache; %s", self.source.name,
                        "held in float8 (--kv-cache-dtype auto)" if resolved != "auto" else
                        "this GPU's attention kernels have no float8 E4M3 (compute "
                        "capability 8.9 on): K and V held in the model's dtype")
        return resolved

    def determine_kv_cache_size(self) -> KVCacheSizing:
        """Blocks the KV budget buys: explicit bytes, else a fraction of the device's memory
        less everything else at its peak (profiled on CUDA); and the model's KV groups."""
        spec = self.runner.kv_cache_spec()
        non_kv, activation = self.info.weight_bytes, 0
        if self.device.type == "cuda":
            non_kv, activation = self._profile_non_kv_bytes()
        budget = kv_budget_bytes(self.config.engine.cache, self.device, non_kv)
        shared = self.device.type == "cpu" and not self.config.engine.cache.kv_cache_memory
        if shared and self.group.size > 1:
            budget //= self.group.size  # the CPU ranks share this host's memory
        cap = self._default_block_cap()
        num_blocks = num_blocks_for(budget, spec, self.config.max_model_len, cap,
                                    self.config.engine.scheduler.max_num_batched_tokens)
        note = describe_kv_budget(self.config.engine.cache, self.device, budget)
        if shared and self.group.size > 1:
            note += f" (each of {self.group.size} ranks: its share of this host's)"
        if cap is not None and num_blocks == cap and cap * spec.bytes_per_block < budget:
            note += (f"; only {num_blocks * spec.bytes_per_block / 2**30:.2f} GiB of it used: "
                     f"{self.config.engine.scheduler.max_num_seqs} sequences of "
                     f"{self.config.max_model_len} tokens, twice over")
        if spec.dtype != self.runner.config.dtype:
            note += (f"; K and V held as {str(spec.dtype).removeprefix('torch.')} "
                     f"(--kv-cache-dtype {self.kv_cache_dtype}), "
                     f"{spec.bytes_per_token} bytes a token")
        logger.info("%s", note)
        return KVCacheSizing(num_blocks, activation, spec.windows)

    def _profile_non_kv_bytes(self) -> tuple[int, int]:
        """Everything but the KV cache at its peak: weights and activations of a full-budget
        step (profiled), plus memory outside torch's allocator (CUDA context, libraries);
        and the activations' share of that peak."""
        sched = self.config.engine.scheduler
        torch_peak = self.runner.profile_peak_memory(sched.max_num_batched_tokens,
                                                     sched.max_num_seqs, self.config.max_model_len)
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)
        logger.info("memory profile: weights %.2f GiB, step peak %.2f GiB, outside torch "
                    "%.2f GiB", self.info.weight_bytes / 2**30, torch_peak / 2**30,
                    outside_torch / 2**30)
        return torch_peak + max(outside_torch, 0), max(torch_peak - self.info.weight_bytes, 0)

    def _default_block_cap(self) -> int | None:
        """With no size in bytes on CPU, never take more than a full batch of full-length
        sequences could use, twice over (the rest keeps prefix-cache hits warm)."""
        cache, sched = self.config.engine.cache, self.config.engine.scheduler
        if self.device.type != "cpu" or cache.kv_cache_memory:
            return None  # (a fraction on CPU is capped too: it was most likely meant for a GPU)
        per_seq = self.runner.kv_cache_spec().blocks_per_seq(self.config.max_model_len,
                                                             sched.max_num_batched_tokens)
        return 2 * sched.max_num_seqs * per_seq + 1

    def initialize_kv_cache(self, num_blocks: int) -> int:
        self.runner.initialize_kv_cache(num_blocks)
        kv = self.runner.kv_cache
        return kv.numel() * kv.element_size()

    def capture_decode_graphs(self) -> bool:
        """Capture decode steps, unless told not to: CUDA graphs with a graph-safe backend
        (a pipeline stage captures its own layers; the transfers stay outside the graphs),
        or on CPU, in one process without LoRA, plans of kernel calls where the model runs
        wholly on pagoda's CPU kernels. Returns whether it did."""
        engine = self.config.engine
        if engine.enforce_eager:
            return False
        shape = (engine.scheduler.max_num_seqs, self.config.max_model_len)
        if self.device.type == "cpu":
            alone = self.group.size == 1 and self.stage.is_first and self.stage.is_last
            return alone and self.runner.lora is None and self.runner.backend.name == "torch" \
                and self.runner.capture_cpu_plans(*shape)
        if self.device.type != "cuda" or self.runner.backend.name != "triton":
            return False
        self.runner.capture_cuda_graphs(*shape)
        return True

    @property
    def returns_output(self) -> bool:
        """Whether this worker's step outputs are the engine's: the last pipeline stage's
        first tensor-parallel rank (every rank holds the same tokens)."""
        return self.stage.is_last and self.group.rank == 0

    def execute_model(self, sched_out: SchedulerOutput) -> None:
        self._launched.append(self.runner.launch(sched_out))

    def sample_tokens(self, grammar_bitmask: torch.Tensor | None) -> None:
        self.runner.sample_tokens(self._launched[-1], grammar_bitmask)

    def collect_output(self) -> ModelRunnerOutput:
        return self.runner.finish(self._launched.popleft())

    def add_lora(self, request: LoRARequest) -> int:
        if self.runner.lora is None:
            raise LoRAAdapterError("LoRA adapters are off: start the server with --enable-lora")
        return self.runner.lora.add(request)

    def remove_lora(self, lora_id: int) -> None:
        if self.runner.lora is not None:
            self.runner.remove_lora(lora_id)

    def sleep(self) -> None:
        self.runner.sleep()

    def wake_up(self) -> bool:
        return self.runner.wake_up()

    def prepare_sleep(self) -> bool:
        return self.runner.weight_sleeper.prepare()

    def shutdown(self) -> None:
        """Drop the launched steps and the runner (with its model, KV cache and graphs)."""
        self._launched.clear()
        self.runner = None
        if self.rank_setup is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _join_groups(setup: RankSetup, device: torch.device, num_layers: int,
                 expert_parallel: bool = False) -> tuple[ParallelGroup, PipelineStage]:
    """Join the workers' process group; returns this rank's tensor-parallel group (the ranks
    of its pipeline stage; `expert_parallel`: splitting experts rather than their width) and
    its stage (its layers, and its neighbours' ranks)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend, init_method=setup.init_method, rank=setup.rank, world_size=setup.world_size,
        timeout=timedelta(seconds=DISTRIBUTED_TIMEOUT_S),
        device_id=device if device.type == "cuda" else None)
    tp, pp = setup.tp_size, setup.pp_size
    stage_index, tp_rank = divmod(setup.rank, tp)
    process_group = torch.distributed.group.WORLD
    if pp > 1 and tp > 1:  # every rank creates every stage's group, in the same order
        groups = [torch.distributed.new_group(list(range(s * tp, (s + 1) * tp)))
                  for s in range(pp)]
        process_group = groups[stage_index]
    group = ParallelGroup(tp_rank, tp, process_group, expert_parallel) if tp > 1 else SINGLE
    start, end = layer_ranges(num_layers, pp)[stage_index]
    stage = WHOLE
    if pp > 1:  # the sampled ids travel back on a group of their own (see share_sampled)
        stage = PipelineStage(
            stage_index, pp, start, end,
            prev_rank=setup.rank - tp if stage_index > 0 else None,
            next_rank=setup.rank + tp if stage_index < pp - 1 else None,
            last_rank=(pp - 1) * tp,
            token_group=torch.distributed.new_group(list(range(setup.world_size))))
    logger.info("rank %d of %d on %s (%s): tensor-parallel rank %d of %d, pipeline stage %d "
                "of %d (layers %d-%d)", setup.rank, setup.world_size, device, backend, tp_rank,
                tp, stage_index, pp, start, end - 1)
    return group, stage


def _log_kv_scales(layers: list[Attention], kv_cache_dtype: str) -> None:
    """One line: the float8 cache's K and V scales over the layers (the checkpoint's, or
    1.0 where it has none)."""
    ks = [layer.kv_scales.k for layer in layers]
    vs = [layer.kv_scales.v for layer in layers]
    if all(layer.kv_scales.is_unit for layer in layers):
        logger.info("KV cache %s: K and V held unscaled (the checkpoint has no calibrated "
                    "scales)", kv_cache_dtype)
        return
    logger.info("KV cache %s: K and V divided by the checkpoint's scales (k %.4g-%.4g, "
                "v %.4g-%.4g over %d layers)", kv_cache_dtype, min(ks), max(ks), min(vs),
                max(vs), len(layers))
