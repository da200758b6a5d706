"""Physical limits: the device's measured ceilings and the lower bound of a workload's time.

Decode is bandwidth-bound: each step must stream every weight byte (the input embedding is
only gathered) plus the KV of every active sequence. Prefill is compute-bound. A step's
floor is max(bytes / bandwidth, FLOPs / peak); a workload's floor sums its steps' floors.
The products of float8 weights (an FP8 checkpoint's, or `--quantization fp8`'s: all but the
16-bit LM head) count at the float8 tensor cores' measured rate where the device has them,
the rest (attention among it) at the model dtype's.

A mixture of experts reads, per step, the weights every token runs (attention, router, dense
layers, head) and only the experts its tokens picked: top_k per MoE layer for one token, the
expected number of distinct experts E * (1 - (1 - k / E) ** batch) for a batch (all of them
soon at throughput batch sizes). Its FLOPs are those of the active parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from pagoda.models.arch.base import ExpertLayout, LayerAttention, head_dim
from pagoda.models.registry import arch_spec


@dataclass(frozen=True, slots=True)
class Ceilings:
    """Measured on the device in this run."""

    device: str
    bandwidth: float  # bytes/s, a large device-to-device copy (read + write counted)
    matmul_flops: float  # FLOP/s, a large matrix product in the model dtype
    float8_matmul_flops: float | None = None  # FLOP/s, the same in float8 (None: not measured)


@dataclass(frozen=True, slots=True)
class HeldWeights:
    """The bytes of weights an engine holds (a quantized model's), of them its routed
    experts' (0: none, or not counted apart) and its input table's (None: the table's
    parameters at the model's itemsize)."""

    total: int
    experts: int = 0
    table: int | None = None


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What one token costs the model, from its architecture's declaration: the weights it
    streams and, per layer, the KV it reads (a sliding-window layer reads only its window)."""

    layers: tuple[LayerAttention, ...]
    query_width: int  # query heads x head_dim
    matmul_params: int  # parameters one token runs (all but an untied input embedding and,
    # in a mixture of experts, the experts it was not routed to)
    weight_bytes_read: int  # bytes streamed per step of one token
    itemsize: int
    experts: ExpertLayout | None = None  # a mixture of experts' routed experts
    kv_itemsize: int = 0  # bytes of a cached K or V element (0: itemsize)
    expert_param_bytes: float = 0.0  # bytes a routed expert's parameter is held in (0: itemsize)
    float8_params: int = 0  # of matmul_params, those held in float8 (their products may run
    # on float8 tensor cores)

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype) -> ModelShape:
        spec = arch_spec(config)
        params = spec.count_active_parameters(config)
        if not getattr(config, "tie_word_embeddings", False):
            params -= config.vocab_size * config.hidden_size  # the input embedding is gathered
        size = torch.empty((), dtype=dtype).element_size()
        return cls(tuple(spec.layer_attention(config)),
                   config.num_attention_heads * head_dim(config), params, params * size, size,
                   spec.experts(config) if spec.experts else None)

    def with_kv_dtype(self, kv_dtype: torch.dtype) -> ModelShape:
        """The same model with its KV cache held in `kv_dtype` (a float8 cache)."""
        return replace(self, kv_itemsize=torch.empty((), dtype=kv_dtype).element_size())

    def holding(self, held: HeldWeights, config: Any) -> ModelShape:
        """The shape of the model whose weights the engine holds as `held` (a quantized
        one): a step streams those bytes, less an untied input embedding's (gathered: its
        bytes in `held`, by default in the model dtype) and, in a mixture of experts, less the
        experts a token is not routed to (each expert parameter at the experts' bytes a
        parameter)."""
        if getattr(config, "tie_word_embeddings", False):
            table = 0
        elif held.table is not None:
            table = held.table
        else:
            table = config.vocab_size * config.hidden_size * self.itemsize
        read = held.total - table
        if self.experts is None or not held.experts:
            return replace(self, weight_bytes_read=read)
        e = self.experts
        per_param = held.experts / (e.moe_layers * e.num_experts * e.params_per_expert)
        return replace(self, weight_bytes_read=round(read - e.idle_parameters * per_param),
                       expert_param_bytes=per_param)

    def with_float8_products(self, config: Any) -> ModelShape:
        """The same model with its weights in float8 but for the LM head (vocab x hidden),
        which float8 checkpoints keep in 16 bits."""
        return replace(self, float8_params=self.matmul_params
                       - config.vocab_size * config.hidden_size)

    def matmul_seconds(self, tokens: int, attention_flops: float, ceil: Ceilings) -> float:
        """Seconds the products of `tokens` tokens and `attention_flops` of attention take at
        least: float8 weights' at the float8 rate (where measured), the rest at the model
        dtype's."""
        float8 = self.float8_params if ceil.float8_matmul_flops else 0
        seconds = (2.0 * (self.matmul_params - float8) * tokens + attention_flops) \
            / ceil.matmul_flops
        if float8:
            seconds += 2.0 * float8 * tokens / ceil.float8_matmul_flops
        return seconds

    def step_weight_bytes(self, batch: int) -> float:
        """Weight bytes a decode step of `batch` tokens streams: a dense model all of them,
        a mixture of experts the experts its tokens are expected to touch."""
        if self.experts is None or batch <= 1:
            return self.weight_bytes_read
        e = self.experts
        extra = e.moe_layers * (e.experts_touched(batch) - e.top_k) * e.params_per_expert
        return self.weight_bytes_read + extra * (self.expert_param_bytes or self.itemsize)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token adds over all layers."""
        return sum(2 * layer.num_kv_heads * layer.head_dim
                   for layer in self.layers) * (self.kv_itemsize or self.itemsize)

    def kv_bytes_read(self, context: int) -> int:
        """KV bytes one query token reads over `context` keys (all layers)."""
        return sum(2 * layer.num_kv_heads * layer.head_dim * _seen(context, layer.sliding_window)
                   for layer in self.layers) * (self.kv_itemsize or self.itemsize)

    def attention_flops(self, context: int) -> float:
        """QK^T and PV for one query token over `context` keys (all layers)."""
        return 4.0 * self.query_width * sum(_seen(context, layer.sliding_window)
                                            for layer in self.layers)

    def prefill_attention_flops(self, n: int) -> float:
        """QK^T and PV for a causal prefill of n tokens (all layers)."""
        return 4.0 * self.query_width * sum(_causal_pairs(n, layer.sliding_window)
                                            for layer in self.layers)


def _seen(context: int, window: int | None) -> int:
    return context if window is None else min(context, window)


def _causal_pairs(n: int, window: int | None) -> float:
    """(query, key) pairs of causal attention over n tokens (n^2 / 2 as Llama's reference
    figure counts them), each query seeing at most `window` keys."""
    if window is None or n <= window:
        return n * n / 2
    return window * window / 2 + (n - window) * window


MATMUL_SIDE = 8192  # the ceilings' square products


def measure_ceilings(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                     float8: bool = False) -> Ceilings:
    """Bandwidth by a 2 GiB copy, matmul rate by an 8192^3 product (medians of several);
    with `float8`, on a GPU with float8 tensor cores (compute capability 8.9 and later), the
    rate of the same product of float8 operands (torch._scaled_mm with fast accumulation,
    the fastest the tensor cores go) too."""
    from triton.testing import do_bench
    n = (1 << 30) // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16).view(-1)
    src = torch.cat([src, src])  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device, dtype=dtype)
    b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device, dtype=dtype)
    mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    flops = 2 * MATMUL_SIDE ** 3
    float8_rate = None
    if float8 and torch.cuda.get_device_capability(device) >= (8, 9):
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # b8 column-major
        one = torch.ones((), device=device)
        mm8_ms = do_bench(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one,
                                                   out_dtype=torch.bfloat16,
                                                   use_fast_accum=True),
                          warmup=50, rep=300, return_mode="median")
        float8_rate = flops / (mm8_ms / 1e3)
    name = torch.cuda.get_device_name(device)
    return Ceilings(name, 2 * src.numel() * src.element_size() / (copy_ms / 1e3),
                    flops / (mm_ms / 1e3), float8_rate)


def decode_step_floor(shape: ModelShape, ceil: Ceilings, contexts: list[int]) -> float:
    """Seconds one decode step over sequences of these context lengths needs at least."""
    kv_bytes = sum(shape.kv_bytes_read(c) for c in contexts)
    attention = sum(shape.attention_flops(c) for c in contexts)
    return max((shape.step_weight_bytes(len(contexts)) + kv_bytes) / ceil.bandwidth,
               shape.matmul_seconds(len(contexts), attention, ceil))


def prefill_floor(shape: ModelShape, ceil: Ceilings, prompt_lens: list[int]) -> float:
    """Seconds to prefill these prompts at least (compute: matmuls + causal attention)."""
    attention = sum(shape.prefill_attention_flops(n) for n in prompt_lens)
    return shape.matmul_seconds(sum(prompt_lens), attention, ceil)


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
