"""Build a model for a resolved source and fill its weights (checkpoint or random)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from pagoda.errors import UnsupportedModelError
from pagoda.layers.parallel import SINGLE, WHOLE, ParallelGroup, PipelineStage
from pagoda.logger import get_logger
from pagoda.models.interface import CausalLM
from pagoda.models.loader.dummy import init_dummy_weights
from pagoda.models.loader.gguf import iter_gguf
from pagoda.models.loader.safetensors import iter_safetensors
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
               stage: PipelineStage = WHOLE) -> CausalLM:
    """Instantiate the model (this rank's shard of it: its tensor-parallel slice of its
    pipeline stage's layers) on the device in dtype and load its weights."""
    start = time.perf_counter()
    cls = model_class(source.hf_config)
    if stage.count > 1 and not cls.supports_pipeline_parallel:
        raise UnsupportedModelError(f"{cls.__name__} does not support pipeline parallelism")
    with _default_dtype(dtype), torch.device(device):
        model = cls(source.hf_config, max_position, group, stage)
    if source.format == "dummy":
        init_dummy_weights(model, seed)
    else:
        _load_checkpoint(model, source)
        source.gguf_tensors = None  # unmap the GGUF: its pages would count as ours for good
    model.eval()
    logger.info("loaded %s (%s, %s) in %.1fs: %.2f GiB of weights", source.name, source.format,
                str(dtype).removeprefix("torch."), time.perf_counter() - start,
                weight_bytes(model) / 2**30)
    return model


def iter_weights(source: ModelSource, sliced: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor) for every weight of the checkpoint. `sliced`: a
    tensor-parallel rank's load, which reads only the slices it keeps (safetensors)."""
    if source.format == "safetensors":
        yield from iter_safetensors(source.path, lazy=sliced)
    elif source.format == "gguf" and source.gguf_file is not None:
        yield from iter_gguf(source.gguf_file, source.hf_config, source.gguf_tensors)
    else:
        raise UnsupportedModelError(f"{source.name}: no weights to read for format {source.format!r}")


def _load_checkpoint(model: CausalLM, source: ModelSource) -> None:
    total = len(model.expected_weights())
    weights = iter_weights(source, sliced=model.group.size > 1)
    loaded = model.load_weights(_with_progress(weights, total, source.name))
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
