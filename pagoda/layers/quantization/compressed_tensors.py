"""compressed-tensors checkpoints (what llmcompressor writes): one config group targeting
Linear layers, either 8-bit float weights (`float-quantized`: FP8, FP8_DYNAMIC), 4 or 8-bit
integers packed into int32s (`pack-quantized`: W4A16, W4A16_ASYM, W8A16), or int8 weights
as they are (`int-quantized`: the W8A8 int8 schemes, run weight-only)."""

from __future__ import annotations

from typing import Any

from pagoda.errors import UnsupportedModelError
from pagoda.layers.quantization.base import QuantizationConfig
from pagoda.logger import get_logger

logger = get_logger(__name__)


def compressed_tensors_config(values: dict[str, Any]) -> QuantizationConfig:
    """The config of a checkpoint's `quantization_config` (quant_method compressed-tensors)."""
    groups = list((values.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    kinds = ", ".join(f"{w.get('type')}{w.get('num_bits')}" for w in weights) or "none"
    if len(groups) != 1:
        raise UnsupportedModelError(f"compressed-tensors with {len(groups)} config groups "
                                    f"({kinds}) is not supported yet (one group is)")
    args, ignore = weights[0], list(values.get("ignore") or ())
    kind = (args.get("type"), int(args.get("num_bits") or 0))
    if kind == ("float", 8):
        from pagoda.layers.quantization.fp8 import CompressedTensorsFp8Config
        return CompressedTensorsFp8Config(args, ignore)
    fmt = groups[0].get("format") or values.get("format")
    if kind in (("int", 4), ("int", 8)) and fmt == "pack-quantized":
        from pagoda.layers.quantization.int_checkpoints import PackedIntConfig
        return PackedIntConfig(args, ignore)
    if kind == ("int", 8) and fmt == "int-quantized":
        from pagoda.layers.quantization.int_checkpoints import NaiveInt8Config
        if groups[0].get("input_activations"):
            logger.info("compressed-tensors int8 weights run weight-only (W8A16): their "
                        "int8 activation scheme is not applied")
        return NaiveInt8Config(args, ignore)
    raise UnsupportedModelError(f"compressed-tensors {fmt or ''} weights of {kinds} are not "
                                "supported yet (float8; int4 or int8 pack-quantized; int8 "
                                "int-quantized)")
