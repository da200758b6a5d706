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


def iter_safetensors(path: Path, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the directory's shards. `lazy`: each tensor as a
    CheckpointSlice, of which a weight loader reads only the part its rank keeps."""
    from safetensors import safe_open

    for shard in safetensors_files(path):
        with safe_open(shard, framework="pt") as tensors:
            for name in tensors.keys():
                if lazy:
                    part = tensors.get_slice(name)
                    yield name, CheckpointSlice(part, [(0, n) for n in part.get_shape()])
                else:
                    yield name, tensors.get_tensor(name)


class CheckpointSlice:
    """A checkpoint tensor not read yet. `shape`, `dim()`, `narrow()` and indexing (ints
    and plain slices) only narrow down which part is wanted; `materialize()` reads just that
    part from the file. Anything else reads the part and acts on the tensor."""

    def __init__(self, source: Any, ranges: list[tuple[int, int]],
                 dropped: frozenset[int] = frozenset()) -> None:
        self._source = source  # safetensors' slice of the whole tensor
        self._ranges = ranges  # [start, stop) in every dim of the stored tensor
        self._dropped = dropped  # stored dims indexed by an int: not in this view's shape

    @property
    def _kept(self) -> list[int]:
        return [d for d in range(len(self._ranges)) if d not in self._dropped]

    @property
    def shape(self) -> torch.Size:
        import torch
        return torch.Size(self._ranges[d][1] - self._ranges[d][0] for d in self._kept)

    def dim(self) -> int:
        return len(self._kept)

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        stored = self._kept[dim]
        first, stop = self._ranges[stored]
        if start < 0 or length < 0 or first + start + length > stop:
            raise IndexError(f"narrow({dim}, {start}, {length}) is outside {tuple(self.shape)}")
        ranges = list(self._ranges)
        ranges[stored] = (first + start, first + start + length)
        return CheckpointSlice(self._source, ranges, self._dropped)

    def __getitem__(self, key: Any) -> CheckpointSlice:
        keys = key if isinstance(key, tuple) else (key,)
        view, dropped = self, set()
        for dim, k in enumerate(keys):
            if isinstance(k, int):
                size = view.shape[dim]
                index = k + size if k < 0 else k
                if not 0 <= index < size:
                    raise IndexError(f"index {k} is outside dim {dim} of {tuple(view.shape)}")
                view = view.narrow(dim, index, 1)
                dropped.add(self._kept[dim])
            elif isinstance(k, slice) and k.step in (None, 1):
                start, stop, _ = k.indices(view.shape[dim])
                view = view.narrow(dim, start, max(stop - start, 0))
            else:
                raise TypeError(f"a checkpoint slice takes ints and plain slices, not {k!r}")
        return CheckpointSlice(self._source, view._ranges, self._dropped | dropped)

    def materialize(self) -> torch.Tensor:
        part = self._source[tuple(slice(a, b) for a, b in self._ranges)]
        return part.reshape(self.shape)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets}, read from the header of one .safetensors
    file (a little-endian u64 length, then that many bytes of JSON); no tensor data is read."""
    with path.open("rb") as file:
        prefix = file.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if length > path.stat().st_size - 8:  # (not a header: never read it)
            length = -1
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
