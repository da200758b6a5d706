"""Reading safetensors checkpoints: the shard files, their tensors, and their headers."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagoda.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's shards: those the index names if there is one, else every *.safetensors."""
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return [path / name for name in sorted(shards)]
    return sorted(path.glob("*.safetensors"))


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the directory's shards."""
    from safetensors import safe_open

    for shard in safetensors_files(path):
        with safe_open(shard, framework="pt") as tensors:
            for name in tensors.keys():
                yield name, tensors.get_tensor(name)


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
    for shard in safetensors_files(path):
        for name, info in safetensors_header(shard).items():
            yield name, tuple(info["shape"])


def safetensors_dtypes(path: Path) -> Iterator[tuple[str, str]]:
    """(tensor name, safetensors dtype name: F16, I32, F8_E4M3...) for every tensor."""
    for shard in safetensors_files(path):
        for name, info in safetensors_header(shard).items():
            yield name, str(info["dtype"])
