"""Writing small float32 GGUF files for the loader tests, the way llama.cpp's converter lays
them out (its metadata keys and tensor names)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import gguf
import numpy as np


def write_gguf(path: Path, arch: str, tensors: Mapping[str, np.ndarray],
               add_metadata: Callable[[gguf.GGUFWriter], None],
               types: Mapping[str, str] | None = None,
               blocks: Mapping[str, tuple[str, np.ndarray]] | None = None) -> Path:
    """A GGUF of architecture `arch` holding `tensors` (as float32, or quantized by gguf-py
    to the type `types` names for them; those `blocks` names as its (type, [rows, row
    bytes] uint8 blocks) instead: the types gguf-py cannot quantize to) and the metadata
    `add_metadata` writes."""
    writer = gguf.GGUFWriter(str(path), arch)
    add_metadata(writer)
    for name, array in tensors.items():
        if name in (blocks or {}):
            kind, rows = blocks[name]
            writer.add_tensor(name, rows, raw_dtype=gguf.GGMLQuantizationType[kind])
            continue
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
