"""Build a model for a resolved source and fill its weights (checkpoint or random)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import deferred_linear_methods
from pagoda.layers.moe.layer import FusedMoE
from pagoda.layers.parallel import SINGLE, WHOLE, ParallelGroup, PipelineStage
from pagoda.layers.quantization import (
    bind_embeddings,
    bind_experts,
    bind_linear_methods,
    finish_linear_layers,
    get_quantization_config,
)
from pagoda.layers.quantization.base import QuantizationConfig
from pagoda.layers.rotary import shared_rotary_tables
from pagoda.logger import get_logger
from pagoda.models.interface import CausalLM
from pagoda.models.loader.dummy import init_dummy_weights
from pagoda.models.loader.gguf import FLOAT_TYPES, iter_gguf
from pagoda.models.loader.safetensors import iter_safetensors
from pagoda.models.loader.weights import (
    decoded_experts,
    fused_target,
    stacked_expert_target,
)
from pagoda.models.quantization import resolve_quantization
from pagoda.models.registry import model_class
from pagoda.models.source import ModelSource

logger = get_logger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device,
               max_position: int, seed: int = 0, group: ParallelGroup = SINGLE,
               stage: PipelineStage = WHOLE, quantization: str | None = None) -> CausalLM:
    """Instantiate the model (this rank's shard of it: its tensor-parallel slice of its
    pipeline stage's layers) on the device in dtype and load its weights, its linear layers
    in `quantization`'s form (a name resolve_quantization gave)."""
    start = time.perf_counter()
    cls = model_class(source.hf_config)
    if stage.count > 1 and not cls.supports_pipeline_parallel:
        raise UnsupportedModelError(f"{cls.__name__} does not support pipeline parallelism")
    config = get_quantization_config(quantization, source.hf_config) if quantization else None
    with _default_dtype(dtype), torch.device(device):
        with deferred_linear_methods(), shared_rotary_tables():
            model = cls(source.hf_config, max_position, group, stage)
        bind_linear_methods(model, config)
        bind_experts(model, config, from_checkpoint=source.format != "dummy")
        bind_embeddings(model, config)
        if source.format == "dummy":
            init_dummy_weights(model, seed)
        else:
            _load_checkpoint(model, source, config)
            source.gguf_tensors = None  # unmap the GGUF: its pages would count as ours for good
        kernels = finish_linear_layers(model)
    model.eval()
    logger.info("loaded %s (%s, %s%s) in %.1fs: %.2f GiB of weights", source.name,
                source.format, str(dtype).removeprefix("torch."),
                f", {quantization} weights" if quantization else "",
                time.perf_counter() - start, weight_bytes(model) / 2**30)
    if quantization:
        logger.info("linear kernels: %s", "; ".join(f"{leaf}: {kernel}"
                                                    for leaf, kernel in kernels.items()))
    return model


def model_quantization(requested: str | None, source: ModelSource,
                       device: torch.device) -> str | None:
    """The format to load with: `--quantization` checked against the checkpoint (a
    mismatch raises ConfigError), else the checkpoint's; a GGUF's blocks are kept on every
    device unless `--quantization none` asks for them decoded at load. Kept on a GPU, the
    8B as a Q4_K_M GGUF takes 4.6 GiB against bf16's 15 GiB and decodes a single stream
    in 3.64 ms a token (the bf16 8B: 6.03), but serves 300 requests of 1,024 -> 512 tokens
    at 0.82x the throughput of its blocks decoded to bf16 (an H100,
    bench/results/README.md); one log line says so."""
    quantization = resolve_quantization(requested, source)
    if quantization == "gguf" and device.type == "cuda":
        _log_gguf_kept(source.name)
    return quantization


@functools.cache
def _log_gguf_kept(name: str) -> None:
    logger.info("%s: GGUF blocks kept quantized on the GPU (--quantization none decodes them "
                "to --dtype at load: 3-4x the memory, more throughput at large batches)", name)


def iter_weights(source: ModelSource, keep_blocks: Callable[[str, str], bool] | None = None,
                 sliced: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor) for every weight of the checkpoint; GGUF tensors
    that `keep_blocks(name, type)` picks come as their blocks. `sliced`: a tensor-parallel
    rank's load, which reads only the slices it keeps (safetensors; GGUF matrices decoded
    at load decode only those)."""
    if source.format == "safetensors":
        yield from iter_safetensors(source.path, lazy=sliced)
    elif source.format == "gguf" and source.gguf_file is not None:
        yield from iter_gguf(source.gguf_file, source.hf_config, source.gguf_tensors,
                             keep_blocks, lazy=sliced)
    else:
        raise UnsupportedModelError(
            f"{source.name}: no weights to read for format {source.format!r}")


class _BlockKeeper:
    """Whether GGUF tensor `name` of a block type loads into a parameter that keeps that
    type's blocks; remembers the types such a parameter had decoded instead, and those of
    experts held as floats while other layers keep their blocks."""

    def __init__(self, model: CausalLM) -> None:
        self.params = dict(model.named_parameters())
        self.packed = model.packed_modules
        self.decoded: set[str] = set()
        self.decoded_experts: set[str] = set()
        self.keeps_any = any(hasattr(p, "gguf_blocks") for p in self.params.values())

    def __call__(self, name: str, type_name: str) -> bool:
        stacked = stacked_expert_target(name)  # every expert's one projection
        target = self.params.get(stacked or fused_target(name, self.packed)[0])
        keeps = getattr(target, "gguf_blocks", None)
        if keeps is None:
            if stacked and self.keeps_any and type_name not in FLOAT_TYPES:
                self.decoded_experts.add(type_name)
            return False
        if not keeps(type_name):
            if type_name not in FLOAT_TYPES:  # floats are read as floats, not decoded
                self.decoded.add(type_name)
            return False
        return True


def _load_checkpoint(model: CausalLM, source: ModelSource,
                     config: QuantizationConfig | None) -> None:
    total = len(model.expected_weights())
    keeper = _BlockKeeper(model) if source.format == "gguf" else None
    weights = iter_weights(source, keeper, sliced=model.group.size > 1)
    if config is not None:  # a mixture of experts' experts: codes, or decoded at load
        as_codes = any(m.loads_codes for m in model.modules() if isinstance(m, FusedMoE))
        weights = decoded_experts(weights, config, as_codes)
    loaded = model.load_weights(_with_progress(weights, total, source.name))
    if keeper is not None and keeper.decoded:
        logger.info("%s: GGUF %s weights of linear layers decoded at load (no kernel for their "
                    "blocks on this device)", source.name, ", ".join(sorted(keeper.decoded)))
    if keeper is not None and keeper.decoded_experts:
        logger.info("%s: GGUF %s experts decoded at load (experts keep their blocks on CPU "
                    "only, one rank holding them all)", source.name,
                    ", ".join(sorted(keeper.decoded_experts)))
    refused = sum(m.stacks_refused for m in model.modules() if isinstance(m, FusedMoE))
    if refused:
        logger.info("%s: experts of %d layers held as floats (a layout the GPU's MoE kernel "
                    "does not take)", source.name, refused)
    missing = model.expected_weights() - loaded
    if missing:
        sample = ", ".join(sorted(missing)[:5])
        raise UnsupportedModelError(
            f"checkpoint {source.name!r} lacks {len(missing)} weights the model needs ({sample})")


def _with_progress(weights: Iterator[tuple[str, torch.Tensor]], total: int,
                   name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Log loading progress at every quarter of the expected tensors."""
    marks = {max(1, total * q // 4) for q in (1, 2, 3)}
    for count, item in enumerate(weights, 1):
        if count in marks:
            logger.info("loading %s: %d%% of weights", name, round(100 * count / total))
        yield item


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel() * param.element_size()
    return total


def expert_weight_bytes(model: nn.Module) -> int:
    """Of weight_bytes, what a mixture of experts' routed experts hold (however held)."""
    return sum(weight_bytes(m) for m in model.modules() if isinstance(m, FusedMoE))
