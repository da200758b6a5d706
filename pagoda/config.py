"""Engine configuration: model, KV cache and scheduler settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagoda.errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch is imported lazily here: the server builds a config and spawns the engine process
# before paying for torch, so both processes start up at the same time.
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def check_dtype_name(name: Any) -> None:
    """Refuse a dtype name that resolve_dtype() would not know (without importing torch)."""
    if isinstance(name, str) and name != "auto" and name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use auto, float32, float16 or bfloat16")


def resolve_max_model_len(hf_config: Any, requested: int | None) -> int:
    """The context length: the model's (max_position_embeddings) unless a shorter one is
    asked for; a longer one is a ConfigError that says where the limit comes from."""
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if requested is None:
        return int(limit)
    if requested > limit:
        raise ConfigError(f"max_model_len={requested} exceeds the model's limit of {limit} "
                          f"(max_position_embeddings in its config)")
    return requested


def resolve_dtype(name: str | torch.dtype, device: torch.device,
                  checkpoint_dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Map a dtype name ('auto' included) to a torch dtype for this device; 'auto' takes the
    checkpoint's (config.json's dtype name) where it is a GPU half type."""
    import torch
    if isinstance(name, torch.dtype):
        return name
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = getattr(torch, _DTYPES.get(checkpoint_dtype, ""), None)
    if name != "auto":
        check_dtype_name(name)
        return getattr(torch, _DTYPES[name])
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16


def parse_bytes(text: str) -> int:
    """'512MiB', '4G', '1073741824' -> bytes (ValueError if it is not a size)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def resolve_device(name: str) -> torch.device:
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    return device


@dataclass(slots=True)
class CacheConfig:
    """KV cache layout and size. Size: absolute bytes, else a fraction of memory."""

    block_size: int = 16
    kv_cache_memory: int | str | None = None  # bytes for the KV cache (or a size: "512MiB")
    memory_utilization: float | None = None  # fraction of the device this engine may use
    enable_prefix_caching: bool = True
    cpu_default_kv_bytes: int = 4 << 30
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8 (= fp8_e4m3) or fp8_e5m2

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ConfigError("block_size must be a power of two in [1, 256]")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if isinstance(self.kv_cache_memory, str):
            try:
                self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
            except ValueError:
                raise ConfigError("kv_cache_memory must be bytes or a size like '512MiB', got "
                                  f"{self.kv_cache_memory!r}") from None
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError("kv_cache_memory must be positive")
        if self.memory_utilization is not None and not 0.0 < self.memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")


# --kv-cache-dtype values (vLLM's names): auto (the model's dtype, or float8 for a checkpoint
# calibrated for it: pagoda.models.quantization.resolve_kv_cache_dtype), bfloat16 (half a
# float32 model's cache on CPU) or float8 (element types in
# pagoda.runner.memory.kv_cache_torch_dtype)
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(slots=True)
class SchedulerConfig:
    """Token budget and concurrency limits of one engine step."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    # schedule and launch step N+1 while step N runs on the device (its sampled tokens feed
    # N+1 on the device); None: on for CUDA, where it hides the host's work behind the GPU's
    async_scheduling: bool | None = None
    # newly admitted requests' prefills get a step of their own before the next decode step:
    # first tokens sooner on average, for fewer tokens a second (an extra step's overhead)
    # and a longer gap between the running requests' tokens; off by default
    prefill_first: bool = False

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ConfigError("max_num_batched_tokens and max_num_seqs must be >= 1")


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(slots=True)
class LoRAConfig:
    """LoRA adapters (vLLM's flags): how many share one batch (device slots), the largest
    rank, how many stay loaded in host memory, and the adapters' dtype."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras
    lora_dtype: str = "auto"  # auto: the model's dtype

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ConfigError("max_loras must be >= 1")
        if self.max_lora_rank not in LORA_RANKS:
            raise ConfigError(f"max_lora_rank must be one of {', '.join(map(str, LORA_RANKS))}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError("max_cpu_loras must be >= max_loras")
        if self.lora_dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ConfigError("lora_dtype must be auto, float16, bfloat16 or float32")

    @property
    def host_capacity(self) -> int:
        return self.max_cpu_loras or self.max_loras


EXECUTOR_BACKENDS = ("auto", "uni", "mp", "ray")


@dataclass(slots=True)
class ParallelConfig:
    """How many devices one engine spreads the model over (tensor-parallel ranks per
    pipeline stage, times the stages), and how its workers run: `uni` is one worker inside
    the engine process, `mp` one worker process per rank on this machine, `ray` one Ray actor
    per rank on a running Ray cluster, across its nodes (auto: `mp` when there is more than
    one rank, else `uni`; `ray` only when asked for)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str = "auto"
    # mixture-of-experts layers split their experts over the tensor-parallel ranks
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ConfigError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ConfigError(f"distributed_executor_backend must be one of "
                              f"{', '.join(EXECUTOR_BACKENDS)}")
        if self.distributed_executor_backend == "uni" and self.world_size > 1:
            raise ConfigError("distributed_executor_backend 'uni' runs one worker: use 'mp' or "
                              "'ray' for more than one rank")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def backend(self) -> str:
        """The executor backend resolved: `uni`, `mp` or `ray`."""
        if self.distributed_executor_backend != "auto":
            return self.distributed_executor_backend
        return "mp" if self.world_size > 1 else "uni"


@dataclass(slots=True)
class EngineConfig:
    """Everything an engine needs to start; the model part is resolved at load time."""

    model: str = "smollm2"
    tokenizer: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    quantization: str | None = None  # vLLM's names; None: what the checkpoint holds
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs
    lora: LoRAConfig | None = None  # None: LoRA adapters off
    parallel: ParallelConfig = field(default_factory=ParallelConfig)



_CACHE_KEYS = {"block_size", "kv_cache_memory", "enable_prefix_caching", "kv_cache_dtype"}
_SCHED_KEYS = {"max_num_batched_tokens", "max_num_seqs", "async_scheduling", "prefill_first"}
_LORA_KEYS = {"max_loras", "max_lora_rank", "max_cpu_loras", "lora_dtype"}
_PARALLEL_KEYS = {"tensor_parallel_size", "pipeline_parallel_size",
                  "distributed_executor_backend", "enable_expert_parallel"}


def engine_config(model: str, **kwargs: Any) -> EngineConfig:
    """Build an EngineConfig from vLLM-style flat keyword arguments."""
    cache = {k: kwargs.pop(k) for k in list(kwargs) if k in _CACHE_KEYS}
    if "gpu_memory_utilization" in kwargs:
        cache["memory_utilization"] = kwargs.pop("gpu_memory_utilization")
    sched = {k: kwargs.pop(k) for k in list(kwargs) if k in _SCHED_KEYS}
    lora = {k: kwargs.pop(k) for k in list(kwargs) if k in _LORA_KEYS}
    lora_config = LoRAConfig(**lora) if kwargs.pop("enable_lora", False) else None
    parallel = {k: kwargs.pop(k) for k in list(kwargs) if k in _PARALLEL_KEYS}
    return EngineConfig(model=model, cache=CacheConfig(**cache),
                        scheduler=SchedulerConfig(**sched), lora=lora_config,
                        parallel=ParallelConfig(**parallel), **kwargs)
