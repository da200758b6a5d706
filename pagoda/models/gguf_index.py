"""A GGUF file's tensor index (name, type, shape, where its bytes lie), saved as JSON when a
model is pulled, so loading the weights need not parse the file's metadata: gguf's reader
decodes every metadata string (a whole tokenizer's vocabulary), seconds on every start."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

INDEX_NAME = "gguf-tensors.json"
_FORMAT = 1

# types gguf's reader hands out as typed arrays; every other type is bytes, one row per block run
_PLAIN_TYPES = {
    gguf.GGMLQuantizationType.F16: np.float16, gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor of a GGUF file, as gguf's reader lays it out: `shape` in GGUF order (the
    fastest dimension first), `data` in numpy order, typed or raw quantized bytes."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True, slots=True)
class GGUFIndex:
    """A GGUF file's architecture and tensors, read through its saved index."""

    architecture: str
    tensors: list[GGUFTensor]


def reader_tensors(reader: gguf.GGUFReader) -> Iterator[GGUFTensor]:
    """The tensors of a file gguf's reader has parsed."""
    for t in reader.tensors:
        yield GGUFTensor(t.name, t.tensor_type, tuple(int(d) for d in t.shape), t.data)


def write_tensor_index(reader: gguf.GGUFReader, architecture: str, gguf_file: Path,
                       dest: Path) -> None:
    """Save the index of `gguf_file` (open in `reader`) as `dest`."""
    entries = [{"name": t.name, "type": int(t.tensor_type), "shape": [int(d) for d in t.shape],
                "offset": int(t.data_offset), "bytes": int(t.n_bytes)} for t in reader.tensors]
    dest.write_text(json.dumps({"format": _FORMAT, "file_bytes": gguf_file.stat().st_size,
                                "architecture": architecture, "tensors": entries}))


def read_tensor_index(gguf_file: Path, index_file: Path) -> GGUFIndex | None:
    """The tensors of `gguf_file` through its saved index, memory-mapped, or None when the
    index is missing, of another format, or does not match the file (its size changed)."""
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        return None
    size = gguf_file.stat().st_size
    if not isinstance(index, dict) or index.get("format") != _FORMAT \
            or index.get("file_bytes") != size:
        return None
    mapped = np.memmap(gguf_file, dtype=np.uint8, mode="r")
    try:
        return GGUFIndex(str(index["architecture"]),
                         [_tensor(mapped, entry) for entry in index["tensors"]])
    except (KeyError, IndexError, TypeError, ValueError):  # damaged: the reader will do
        return None


def _tensor(mapped: np.ndarray, entry: dict) -> GGUFTensor:
    tensor_type = gguf.GGMLQuantizationType(entry["type"])
    shape = tuple(int(d) for d in entry["shape"])
    start, length = int(entry["offset"]), int(entry["bytes"])
    if start < 0 or start + length > mapped.size:
        raise ValueError(f"tensor {entry['name']} lies outside the file")
    raw = mapped[start:start + length]
    dims = shape[::-1]
    if tensor_type in _PLAIN_TYPES:
        data = raw.view(_PLAIN_TYPES[tensor_type]).reshape(dims)
    else:
        block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        data = raw.reshape(*dims[:-1], dims[-1] // block * type_size)
    return GGUFTensor(str(entry["name"]), tensor_type, shape, data)
