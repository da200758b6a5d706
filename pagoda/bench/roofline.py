"""Physical limits: the device's measured ceilings and the lower bound of a workload's time.

Decode is bandwidth-bound: each step must stream every weight byte (the input embedding is
only gathered) plus the KV of every active sequence. Prefill is compute-bound. A step's
floor is max(bytes / bandwidth, FLOPs / peak); a workload's floor sums its steps' floors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Ceilings:
    """Measured on the device in this run."""

    device: str
    bandwidth: float  # bytes/s, a large device-to-device copy (read + write counted)
    matmul_flops: float  # FLOP/s, a large matrix product in the model dtype


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What one token costs the model, from its config."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    matmul_params: int  # parameters multiplied per token (excludes the input embedding)
    weight_bytes_read: int  # bytes streamed per step (matmul weights + norms)
    kv_bytes_per_token: int

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype) -> ModelShape:
        h, layers = config.hidden_size, config.num_hidden_layers
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        inter, vocab = config.intermediate_size, config.vocab_size
        per_layer = h * (heads + 2 * kv_heads) * head_dim + heads * head_dim * h + 3 * h * inter
        matmul = layers * per_layer + vocab * h  # + lm_head
        norms = (2 * layers + 1) * h
        size = torch.empty((), dtype=dtype).element_size()
        return cls(layers, h, kv_heads, head_dim, matmul, (matmul + norms) * size,
                   2 * layers * kv_heads * head_dim * size)

    def attention_flops(self, context: int) -> float:
        """QK^T and PV for one query token over `context` keys (all layers)."""
        heads_dim = self.hidden_size  # q heads * head_dim for Llama-style models
        return 4.0 * self.num_layers * heads_dim * context


def measure_ceilings(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Ceilings:
    """Bandwidth by a 2 GiB copy, matmul rate by an 8192^3 product (medians of several)."""
    from triton.testing import do_bench
    n = (1 << 30) // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16).view(-1)
    src = torch.cat([src, src])  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    name = torch.cuda.get_device_name(device)
    return Ceilings(name, 2 * src.numel() * src.element_size() / (copy_ms / 1e3),
                    2 * 8192 ** 3 / (mm_ms / 1e3))


def decode_step_floor(shape: ModelShape, ceil: Ceilings, contexts: list[int]) -> float:
    """Seconds one decode step over sequences of these context lengths needs at least."""
    kv_bytes = shape.kv_bytes_per_token * sum(contexts)
    flops = 2.0 * shape.matmul_params * len(contexts) + sum(
        shape.attention_flops(c) for c in contexts)
    return max((shape.weight_bytes_read + kv_bytes) / ceil.bandwidth, flops / ceil.matmul_flops)


def prefill_floor(shape: ModelShape, ceil: Ceilings, prompt_lens: list[int]) -> float:
    """Seconds to prefill these prompts at least (compute: matmuls + causal attention)."""
    flops = sum(2.0 * shape.matmul_params * n + shape.attention_flops(n) * n / 2
                for n in prompt_lens)
    return flops / ceil.matmul_flops


def workload_floor(shape: ModelShape, ceil: Ceilings, prompt_lens: list[int],
                   output_lens: list[int], max_batch: int) -> dict[str, float]:
    """Lower bound for a batch workload run at most max_batch sequences at a time: the
    prefill compute plus decode steps in waves of max_batch, each at its own floor."""
    order = sorted(range(len(prompt_lens)), key=lambda i: -output_lens[i])
    decode = 0.0
    for start in range(0, len(order), max_batch):
        wave = order[start:start + max_batch]
        for step in range(max(output_lens[i] for i in wave)):
            contexts = [prompt_lens[i] + step for i in wave if step < output_lens[i]]
            decode += decode_step_floor(shape, ceil, contexts)
    prefill = prefill_floor(shape, ceil, prompt_lens)
    return {"prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode}
