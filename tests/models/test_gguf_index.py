"""A GGUF tensor index saved at pull time reads the same tensors as gguf's reader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pagoda.models.gguf_index import (
    INDEX_NAME,
    read_tensor_index,
    reader_tensors,
    write_tensor_index,
)
from pagoda.models.loader.checkpoint import iter_weights
from pagoda.models.loader.gguf import GGUFMeta
from pagoda.models.source import resolve_model


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf, "r")  # seconds: its whole vocabulary is parsed


@pytest.fixture
def indexed(tmp_path: Path, smollm2_gguf: Path,
            smollm2_reader: gguf.GGUFReader) -> tuple[gguf.GGUFReader, Path]:
    write_tensor_index(smollm2_reader, "llama", smollm2_gguf, tmp_path / INDEX_NAME)
    return smollm2_reader, tmp_path / INDEX_NAME


def test_the_index_reads_every_tensor_as_the_reader_does(indexed, smollm2_gguf):
    reader, index_file = indexed
    index = read_tensor_index(smollm2_gguf, index_file)
    assert index is not None and index.architecture == "llama"
    expected = list(reader_tensors(reader))
    assert len(index.tensors) == len(expected) > 100
    types = set()
    for got, want in zip(index.tensors, expected):
        assert (got.name, got.tensor_type, got.shape) == (want.name, want.tensor_type, want.shape)
        assert got.data.dtype == want.data.dtype and np.array_equal(got.data, want.data)
        types.add(got.tensor_type.name)
    assert {"Q4_1", "Q8_0", "F32"} <= types  # quantized rows and plain arrays both covered


@pytest.mark.parametrize("damage", ["file size", "format", "offset", "no shape", "not json"])
def test_an_index_that_does_not_fit_the_file_is_not_used(indexed, smollm2_gguf, damage):
    _, index_file = indexed
    index = json.loads(index_file.read_text())
    if damage == "file size":
        index["file_bytes"] += 1
    elif damage == "format":
        index["format"] = 99
    elif damage == "offset":
        index["tensors"][-1]["offset"] = smollm2_gguf.stat().st_size
    elif damage == "no shape":
        index["tensors"][0]["shape"] = []
    index_file.write_text("{" if damage == "not json" else json.dumps(index))
    assert read_tensor_index(smollm2_gguf, index_file) is None


def test_a_missing_index_is_not_used(tmp_path, smollm2_gguf):
    assert read_tensor_index(smollm2_gguf, tmp_path / INDEX_NAME) is None


def test_pulled_weights_load_through_the_index_unchanged(monkeypatch):
    """The pulled model's weights come through its index, with no metadata parsed, and equal
    those read through gguf's reader."""
    def no_parsing(path):
        raise AssertionError("the GGUF's metadata was parsed")
    with monkeypatch.context() as patch:
        patch.setattr(GGUFMeta, "open", no_parsing)
        source = resolve_model("smollm2")
        via_index = dict(iter_weights(source))
    source.gguf_tensors = None  # read at load time, through gguf's reader
    via_reader = dict(iter_weights(source))
    assert via_index.keys() == via_reader.keys()
    assert all(torch.equal(via_index[name], via_reader[name]) for name in via_index)


def test_a_gguf_given_by_path_is_parsed_once(smollm2_gguf, monkeypatch):
    """Its config and its tensors come from one parse of the metadata."""
    opened = []
    real_open = GGUFMeta.open

    def counting_open(path):
        opened.append(path)
        return real_open(path)
    monkeypatch.setattr(GGUFMeta, "open", counting_open)
    source = resolve_model(str(smollm2_gguf))
    assert source.gguf_tensors is not None and source.gguf_tensors.architecture == "llama"
    weights = dict(iter_weights(source))
    assert len(opened) == 1 and "model.embed_tokens.weight" in weights


def test_loading_lets_go_of_the_mapped_file(smollm2_gguf):
    from pagoda.models.loader.checkpoint import load_model
    source = resolve_model(str(smollm2_gguf))
    load_model(source, torch.float32, torch.device("cpu"), max_position=256)
    assert source.gguf_tensors is None
