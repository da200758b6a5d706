"""Memory a model will need, before any weight is read: weights, KV cache for a concurrency at
a context length, an activation allowance, and whether it fits a device.

Weights count the checkpoint's tensors from the safetensors or GGUF headers (only those the
engine keeps as parameters) at the dtype the engine would pick; a config-only source falls
back to the parameter formula of pagoda's Llama layers. KV is computed as the engine
allocates it (16-token blocks plus the reserved null block). The activation figure is an
allowance, not a measurement: on a GPU the engine profiles the real peak at startup.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pagoda.config import resolve_dtype
from pagoda.errors import ConfigError, UnsupportedModelError
from pagoda.models.gguf_index import GGUFIndex
from pagoda.models.llama import IGNORED_PARAMS
from pagoda.models.source import ModelSource, _arch, _hf_name, _safetensors_files, read_gguf_tensors

GIB = 1 << 30
BLOCK_SIZE = 16
CUDA_CONTEXT_BYTES = 512 << 20  # CUDA context, cuBLAS workspaces: roughly, per GPU
# usable memory per GPU as nvidia-smi reports it (MiB)
DEVICES_MIB = {"H100": 81559, "H200": 143771, "A100-80G": 81920, "A100-40G": 40960,
               "L40S": 46068, "L4": 23034, "A10": 23028, "RTX4090": 24564}


@dataclass(slots=True)
class MemoryEstimate:
    model: str
    dtype: str
    num_parameters: int
    weights_from: str  # "safetensors header", "gguf header" or "config"
    weight_bytes: int  # per GPU (weights split over tp)
    kv_bytes_per_token: int  # per GPU
    kv_bytes: int  # per GPU: concurrency x max_model_len, in whole blocks, + the null block
    activation_bytes: int  # an allowance for one full step of the token budget
    overhead_bytes: int
    peak_bytes: int  # per GPU
    max_model_len: int
    concurrency: int
    tensor_parallel: int
    device: str | None = None
    device_bytes: int | None = None
    usable_bytes: int | None = None  # device_bytes x gpu_memory_utilization
    fits: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def llama_parameters(config: Any) -> int:
    """Parameters of pagoda's Llama/Mistral model built from this HF config (for a source
    without weight files)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or \
        config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    if getattr(config, "attention_bias", False):
        attention += head_dim * (heads + 2 * kv_heads) + hidden
    mlp = 3 * hidden * inter + (2 * inter + hidden if getattr(config, "mlp_bias", False) else 0)
    per_layer = attention + mlp + 2 * hidden
    embeddings = config.vocab_size * hidden
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else embeddings
    return embeddings + config.num_hidden_layers * per_layer + hidden + lm_head


def engine_keeps(name: str, config: Any) -> bool:
    """Whether pagoda's Llama model allocates a parameter for checkpoint tensor `name`: not
    for rotary buffers, nor for an lm_head tied to the embedding."""
    if name.endswith(IGNORED_PARAMS):
        return False
    return not (name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets}, read from the header of one .safetensors
    file (a little-endian u64 length, then that many bytes of JSON); no tensor data is read."""
    with path.open("rb") as file:
        prefix = file.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        raw = file.read(length) if length >= 0 else b""
    if length < 0 or len(raw) != length:
        raise UnsupportedModelError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise UnsupportedModelError(f"{path}: unreadable safetensors header: {exc}") from None
    header.pop("__metadata__", None)
    return header


def safetensors_shapes(path: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(tensor name, shape) for every tensor of the checkpoint directory's shards."""
    for shard in _safetensors_files(path):
        for name, info in safetensors_header(shard).items():
            yield name, tuple(info["shape"])


def gguf_shapes(path: Path, tensors: GGUFIndex | None = None
                ) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF tensor name, shape) for every GGUF tensor the loader turns into a weight, from the
    file's tensor index (`tensors`, when the source has it; no tensor is dequantized)."""
    found = tensors or read_gguf_tensors(path)
    arch = _arch(found.architecture, path)
    for tensor in found.tensors:
        if tensor.name not in arch.skipped:
            name = _hf_name(arch, tensor.name) or tensor.name
            yield name, tuple(int(d) for d in reversed(tensor.shape))


def count_parameters(source: ModelSource) -> tuple[int, str]:
    """Parameters the engine allocates for `source`, and where the count came from."""
    config = source.hf_config
    if source.format == "safetensors":
        shapes, origin = safetensors_shapes(source.path), "safetensors header"
    elif source.format == "gguf" and source.gguf_file is not None:
        shapes, origin = gguf_shapes(source.gguf_file, source.gguf_tensors), "gguf header"
    else:
        return llama_parameters(config), "config"
    return sum(math.prod(shape) for name, shape in shapes if engine_keeps(name, config)), origin


def kv_bytes_per_token(config: Any, dtype: torch.dtype, tp: int = 1) -> int:
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * max(kv_heads // tp, 1) * head_dim * itemsize


def activation_allowance(config: Any, dtype: torch.dtype, token_budget: int,
                         max_num_seqs: int) -> int:
    """Hidden states, attention and MLP intermediates for one step of `token_budget` tokens,
    plus float32 logits (and their softmax) for up to `max_num_seqs` sampled rows. The
    per-token factors match the engine's profiled peak for the Llama-3.1-8B shape on an H200
    (2.38 GiB above the weights at 8192 tokens and 256 sequences)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    hidden = config.hidden_size
    per_token = (12 * hidden + 6 * config.intermediate_size) * itemsize
    logits = 3 * min(max_num_seqs, token_budget) * config.vocab_size * 4
    return token_budget * per_token + logits


def estimate(source: ModelSource, max_model_len: int, concurrency: int = 1, tp: int = 1,
             dtype: str = "auto", device: str | None = None, token_budget: int = 2048,
             max_num_seqs: int = 64, gpu_memory_utilization: float = 0.9) -> MemoryEstimate:
    """The memory `source` needs to serve `concurrency` sequences of `max_model_len` tokens.
    `device`: a GPU name (H100, ...) to get a fit verdict, "cuda" for GPU figures without
    one, None or "cpu" for CPU figures."""
    config = source.hf_config
    if max_model_len < 1 or concurrency < 1 or tp < 1:
        raise ConfigError("max_model_len, concurrency and tp must be at least 1")
    on_gpu = device is not None and device.lower() != "cpu"
    torch_dtype = resolve_dtype(dtype, torch.device("cuda" if on_gpu else "cpu"),
                                getattr(config, "dtype", None))
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    params, weights_from = count_parameters(source)
    weights = params * itemsize // tp
    per_token = kv_bytes_per_token(config, torch_dtype, tp)
    blocks = concurrency * -(-max_model_len // BLOCK_SIZE) + 1
    kv = blocks * BLOCK_SIZE * per_token
    activations = activation_allowance(config, torch_dtype, token_budget, max_num_seqs)
    overhead = CUDA_CONTEXT_BYTES if on_gpu else 0
    result = MemoryEstimate(
        model=source.name, dtype=str(torch_dtype).removeprefix("torch."),
        num_parameters=params, weights_from=weights_from, weight_bytes=weights,
        kv_bytes_per_token=per_token, kv_bytes=kv, activation_bytes=activations,
        overhead_bytes=overhead, peak_bytes=weights + kv + activations + overhead,
        max_model_len=max_model_len, concurrency=concurrency, tensor_parallel=tp)
    if on_gpu and not device.lower().startswith("cuda"):  # a named GPU: does it fit?
        result.device, result.device_bytes = _device(device)
        result.usable_bytes = int(result.device_bytes * gpu_memory_utilization)
        result.fits = result.peak_bytes <= result.usable_bytes
    return result


def _device(name: str) -> tuple[str, int]:
    for known, mib in DEVICES_MIB.items():
        if known.lower() == name.lower():
            return known, mib << 20
    raise ConfigError(f"unknown device {name!r}; choose from {', '.join(DEVICES_MIB)} or cpu")
