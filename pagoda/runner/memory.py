"""KV cache sizing: bytes per block, and how many blocks a memory budget buys."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pagoda.config import CacheConfig
from pagoda.errors import ConfigError
from pagoda.kv_cache.groups import seq_blocks

CPU_MAX_FRACTION = 0.5  # of available RAM a CPU KV cache may take, whatever the flag says
# float8 caches hold K and V divided by the checkpoint's calibrated scales, or unscaled (a
# scale of 1.0: vLLM's default without calibration; E4M3's range, 448, holds the keys and
# values of the models served); see pagoda.layers.attention.backend.KVScales
FLOAT8_KV = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
             "fp8_e5m2": torch.float8_e5m2}
# 16-bit caches named apart from the model's dtype: K and V rounded to them as they are
# stored, read back as the model's dtype (a float32 model on CPU holds half the bytes)
SIXTEEN_BIT_KV = {"bfloat16": torch.bfloat16}


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type for a --kv-cache-dtype value and the model's dtype."""
    return FLOAT8_KV.get(kv_cache_dtype) or SIXTEEN_BIT_KV.get(kv_cache_dtype, model_dtype)


def check_kv_cache_dtype(kv_dtype: torch.dtype, model_dtype: torch.dtype,
                         device: torch.device) -> None:
    """A 16-bit cache of another type than the model's is read by the CPU kernels only (the
    GPU's attention kernels read 16-bit caches as their queries' type)."""
    if device.type != "cpu" and kv_dtype.itemsize == 2 and kv_dtype != model_dtype:
        cache, model = (str(t).removeprefix("torch.") for t in (kv_dtype, model_dtype))
        raise ConfigError(f"--kv-cache-dtype {cache} under a {model} model runs on CPU only; "
                          f"on {device.type} it takes --dtype {cache} (or --kv-cache-dtype "
                          "auto)")


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Shape of the KV cache: one [2, blocks, block_size, kv_heads, head_dim] slab per layer
    slot (a block holds the K and V of one KV group's num_layers layers), and each group's
    sliding window (None: full attention)."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    windows: tuple[int | None, ...] = (None,)

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def blocks_per_seq(self, seq_len: int, chunk: int) -> int:
        """Blocks one sequence of seq_len tokens holds at most, over every group, when it
        runs at most `chunk` tokens a step (sliding-window groups free what falls out)."""
        return sum(seq_blocks(w, seq_len, chunk, self.block_size) for w in self.windows)


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); falls back to total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_budget_bytes(cache: CacheConfig, device: torch.device, non_kv_peak: int) -> int:
    """Bytes the KV cache may take: explicit bytes, else a fraction of the device's memory
    minus what weights and activations need (non_kv_peak), else the per-device default."""
    if cache.kv_cache_memory is not None:
        return cache.kv_cache_memory
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        fraction = cache.memory_utilization if cache.memory_utilization is not None else 0.9
        return int(total * fraction) - non_kv_peak
    available = available_host_memory()
    if cache.memory_utilization is not None:
        # a GPU fraction (0.9 in most guides) pasted onto a CPU machine must not take the
        # host's RAM from everything else: on CPU it never takes more than half of it
        return int(available * min(cache.memory_utilization, CPU_MAX_FRACTION))
    return min(cache.cpu_default_kv_bytes, available // 2)


def describe_kv_budget(cache: CacheConfig, device: torch.device, budget: int) -> str:
    """One startup line: how the KV cache budget was sized, and from what."""
    gib = budget / 2**30
    if cache.kv_cache_memory is not None:
        return f"KV cache budget {gib:.2f} GiB as given (--kv-cache-memory, or a memory plan)"
    if device.type == "cuda":
        fraction = cache.memory_utilization if cache.memory_utilization is not None else 0.9
        return (f"KV cache budget {gib:.2f} GiB: {fraction:g} of {device}'s memory less the "
                f"weights and the profiled activation peak")
    available = available_host_memory() / 2**30
    if cache.memory_utilization is not None:
        used = min(cache.memory_utilization, CPU_MAX_FRACTION)
        capped = (f" (--gpu-memory-utilization {cache.memory_utilization:g} is capped at "
                  f"{CPU_MAX_FRACTION:g} on CPU)" if used < cache.memory_utilization else "")
        return (f"KV cache budget {gib:.2f} GiB: {used:g} of the {available:.1f} GiB of RAM "
                f"available after loading the weights{capped}; --kv-cache-memory sets it exactly")
    default = cache.cpu_default_kv_bytes / 2**30
    return (f"KV cache budget {gib:.2f} GiB: the CPU default, min({default:g} GiB, half of the "
            f"{available:.1f} GiB of RAM available); --kv-cache-memory or "
            f"--gpu-memory-utilization set it")


def num_blocks_for(budget: int, spec: KVCacheSpec, max_model_len: int,
                   cap: int | None = None, chunk: int | None = None) -> int:
    """Blocks that fit the budget (at most cap); refuses a cache that cannot hold one
    full-length sequence run `chunk` tokens a step (default: all at once)."""
    num_blocks = budget // spec.bytes_per_block
    if cap is not None:
        num_blocks = min(num_blocks, cap)
    # +1: the reserved null block
    needed = spec.blocks_per_seq(max_model_len, chunk or max_model_len) + 1
    if num_blocks < needed:
        have = max(budget, 0) / 2**20
        want = needed * spec.bytes_per_block / 2**20
        raise ConfigError(
            f"the KV cache budget ({have:.1f} MiB) cannot hold one sequence of max_model_len="
            f"{max_model_len} tokens ({want:.1f} MiB needed); raise the KV cache memory "
            f"(--kv-cache-memory / --gpu-memory-utilization) or lower --max-model-len")
    return int(num_blocks)
