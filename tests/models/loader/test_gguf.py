"""Reading GGUF matrices a tensor-parallel rank decodes at load (pagoda/models/loader/gguf.py):
with `lazy`, a matrix of a block type pagoda decodes arrives as a CheckpointSlice whose parts
equal the whole matrix decoded and sliced, and reading a part decodes only its rows and the
blocks covering its columns (a rank no longer decodes the whole tensor to keep a slice)."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.quantization import gguf_blocks
from pagoda.models.loader.gguf import iter_gguf, read_gguf_tensors
from pagoda.models.loader.safetensors import CheckpointSlice
from pagoda.models.source import resolve_model
from tests.models.test_gguf_quantized import UNTIED, write_typed_gguf


@pytest.fixture(scope="module")
def typed_gguf(tmp_path_factory):
    return write_typed_gguf(tmp_path_factory.mktemp("typed") / "typed.gguf")


def tensors(path, lazy: bool) -> dict:
    source = resolve_model(str(path))
    return dict(iter_gguf(path, source.hf_config, read_gguf_tensors(path), lazy=lazy))


@pytest.fixture
def decoded_shapes(monkeypatch):
    """The [rows, row bytes] of every block matrix pagoda decodes, in order."""
    seen, decode = [], gguf_blocks.dequantize_rows

    def counting(rows, type_name):
        seen.append(tuple(rows.shape))
        return decode(rows, type_name)
    monkeypatch.setattr(gguf_blocks, "dequantize_rows", counting)
    return seen


def test_lazy_parts_equal_the_whole_matrix_decoded(typed_gguf):
    whole, lazy = tensors(typed_gguf, False), tensors(typed_gguf, True)
    assert whole.keys() == lazy.keys()
    down = "model.layers.0.mlp.down_proj.weight"  # Q8_0: blocks of 32 inputs
    assert isinstance(lazy[down], CheckpointSlice)
    assert tuple(lazy[down].shape) == tuple(whole[down].shape) == (UNTIED.hidden_size, 128)
    for name, value in lazy.items():
        materialize = getattr(value, "materialize", None)
        assert torch.equal(materialize() if materialize else value, whole[name]), name
    rows = lazy[down].narrow(0, 16, 24).materialize()
    torch.testing.assert_close(rows, whole[down][16:40], rtol=0, atol=0)
    columns = lazy[down].narrow(1, 40, 50).materialize()  # from inside a block to inside another
    torch.testing.assert_close(columns, whole[down][:, 40:90], rtol=0, atol=0)


def test_a_part_decodes_only_its_rows_and_covering_blocks(typed_gguf, decoded_shapes):
    down = tensors(typed_gguf, True)["model.layers.0.mlp.down_proj.weight"]
    decoded_shapes.clear()
    down.narrow(0, 32, 32).materialize()  # a column-parallel rank's half of the rows
    down.narrow(1, 64, 64).materialize()  # a row-parallel rank's half of the inputs
    down.narrow(1, 40, 50).materialize()  # inputs 40-89: blocks 1-2 of 32
    q8_block_bytes = gguf_blocks.FORMATS["Q8_0"].block_bytes
    assert decoded_shapes == [(32, 4 * q8_block_bytes), (64, 2 * q8_block_bytes),
                              (64, 2 * q8_block_bytes)]
