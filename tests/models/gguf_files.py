"""Writing small float32 GGUF files for the loader tests, the way llama.cpp's converter lays
them out (its metadata keys and tensor names)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import gguf
import numpy as np


def add_decoder_metadata(writer: gguf.GGUFWriter, config) -> None:
    """The hyperparameters every decoder-only GGUF carries, from an HF config."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def write_gguf(path: Path, arch: str, tensors: Mapping[str, np.ndarray],
               add_metadata: Callable[[gguf.GGUFWriter], None],
               types: Mapping[str, str] | None = None) -> Path:
    """A GGUF of architecture `arch` holding `tensors` (as float32, or quantized by gguf-py
    to the type `types` names for them) and the metadata `add_metadata` writes."""
    writer = gguf.GGUFWriter(str(path), arch)
    add_metadata(writer)
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        kind = (types or {}).get(name)
        if kind is None:
            writer.add_tensor(name, array)
        else:
            raw_dtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(array, raw_dtype), raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
