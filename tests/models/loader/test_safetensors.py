"""Checkpoint slices: narrowing and indexing a safetensors tensor before reading it gives
what the same operations give on the whole tensor, and a tensor-parallel rank's weight
loaders read only the part that rank keeps."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagoda.layers.parallel import ParallelGroup
from pagoda.models.loader.safetensors import (
    CheckpointSlice,
    iter_safetensors,
    safetensors_header,
)


class Recorder:
    """A safetensors slice that records which parts were read."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.reads = tensor, []

    def __getitem__(self, index):
        self.reads.append(tuple((s.start, s.stop) for s in index))
        return self.tensor[index]


def lazy(tensor: torch.Tensor) -> tuple[CheckpointSlice, Recorder]:
    recorder = Recorder(tensor)
    return CheckpointSlice(recorder, [(0, n) for n in tensor.shape]), recorder


def test_lazy_tensors_from_a_file_read_as_the_whole_ones(tmp_path):
    tensors = {"a": torch.randn(6, 4), "b": torch.randn(3, 5, 2).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    read = dict(iter_safetensors(tmp_path, lazy=True))
    assert read["a"].shape == (6, 4) and read["b"].dim() == 3
    assert torch.equal(read["a"].narrow(0, 2, 3).narrow(1, 1, 2).materialize(),
                       tensors["a"].narrow(0, 2, 3).narrow(1, 1, 2))
    assert torch.equal(read["b"][1].materialize(), tensors["b"][1])
    assert torch.equal(read["b"][-1, 2:5].materialize(), tensors["b"][-1, 2:5])
    assert torch.equal(read["a"].float() + 1, tensors["a"] + 1)  # anything else: read whole


def test_out_of_range_parts_are_refused():
    part, _ = lazy(torch.zeros(4, 4))
    with pytest.raises(IndexError):
        part.narrow(0, 3, 2)
    with pytest.raises(IndexError):
        part[4]
    with pytest.raises(TypeError):
        part[::2]


def test_a_rank_reads_only_its_slices():
    group = ParallelGroup(1, 2)
    column = ColumnParallelLinear(4, 8, group=group)
    weight = torch.randn(8, 4)
    part, recorder = lazy(weight)
    column.weight.weight_loader(column.weight, part)
    assert recorder.reads == [((4, 8), (0, 4))] and torch.equal(column.weight, weight[4:])
    row = RowParallelLinear(8, 4, group=group)
    part, recorder = lazy(weight.T.contiguous())
    row.weight.weight_loader(row.weight, part)
    assert recorder.reads == [((0, 4), (4, 8))]
    qkv = QKVParallelLinear(4, 2, num_heads=4, num_kv_heads=1, group=group)  # KV replicated
    k = torch.randn(2, 4)
    part, recorder = lazy(k)
    qkv.weight.weight_loader(qkv.weight, part, 1)
    assert recorder.reads == [((0, 2), (0, 4))]


@pytest.mark.parametrize("content", [
    b"not a safetensors file", (16).to_bytes(8, "little") + b"{}",
    (2).to_bytes(8, "little") + b"{x", b"\x02\x00"])
def test_a_header_that_is_not_one_is_refused_clearly(tmp_path, content):
    """Text, a length past the file's end, bad JSON, a cut prefix: an UnsupportedModelError
    naming the file (text used to be read as a length of exabytes: a MemoryError)."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UnsupportedModelError, match="model.safetensors: (truncated|unreadable)"):
        safetensors_header(path)


def test_a_real_header_lists_its_tensors(tmp_path):
    save_file({"w": torch.zeros(2, 3)}, tmp_path / "model.safetensors")
    header = safetensors_header(tmp_path / "model.safetensors")
    assert list(header) == ["w"] and header["w"]["shape"] == [2, 3]
