"""pagoda's torch decoders of GGUF blocks against gguf-py's dequantization: random blocks of
every type (with finite float16 scales) and real tensors of the pulled SmolLM2 and Gemma 3."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pagoda.layers.quantization.cpu_block_dot import factored_exactly
from pagoda.layers.quantization.gguf_blocks import (
    FACTORED_FORMATS,
    FORMATS,
    INT4_FORMATS,
    LOWS_OF_SCALES,
    byte_groups,
    dequantize_rows,
    int4_groups,
    scale_factors,
)
from pagoda.models.gguf_index import read_tensor_index
from pagoda.models.loader.gguf import read_gguf_tensors

# byte offsets of each type's float16 fields (d, and m / dmin where it has one)
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
               "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


def random_rows(name: str, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """[rows, row bytes] of random blocks whose float16 fields are finite."""
    fmt, rng = FORMATS[name], np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, columns // fmt.block_weights, fmt.block_bytes),
                          dtype=np.uint8)
    for offset in HALF_FIELDS[name]:
        halves = rng.uniform(-0.1, 0.1, blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = halves[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def gguf_py(rows: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[name])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_random_blocks_decode_as_gguf_py_does(name):
    rows = random_rows(name, 5, 512)
    ours = dequantize_rows(torch.from_numpy(rows), name)
    assert ours.shape == (5, 512)
    assert torch.equal(ours, torch.from_numpy(gguf_py(rows, name)))


@pytest.mark.parametrize("name", sorted(INT4_FORMATS))
def test_int4_groups_rebuild_the_weights(name):
    rows = random_rows(name, 3, 256, seed=1)
    codes, scale, low = int4_groups(torch.from_numpy(rows), name)
    assert int(codes.max()) <= 15 and codes.dtype == torch.uint8
    weights = codes.reshape(3, -1, 32).float() * scale[..., None] + low[..., None]
    # float32 products may round where gguf-py fuses differently: within one ulp or so
    torch.testing.assert_close(weights.reshape(3, -1), torch.from_numpy(gguf_py(rows, name)),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_byte_groups_rebuild_the_weights(name):
    rows = random_rows(name, 3, 512, seed=2)
    codes, scale, low, group = byte_groups(torch.from_numpy(rows), name)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 512)
    assert scale.shape == low.shape == (3, 512 // group)
    weights = codes.reshape(3, -1, group).float() * scale[..., None] + low[..., None]
    expected = torch.from_numpy(gguf_py(rows, name))
    # code * scale + min rounds differently from gguf-py's (code - offset) * scale
    torch.testing.assert_close(weights.reshape(3, -1), expected, rtol=1e-5,
                               atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("name", sorted(FACTORED_FORMATS))
def test_factored_scales_are_the_byte_groups_scales_and_lows_to_the_bit(name):
    """The k-quants' and IQ4_XS's scales as their blocks store them (an integer a group
    times a super-block's float16) multiply out to byte_groups' scales and lows exactly,
    the form the CPU block-dot kernel holds in fewer bytes."""
    rows = torch.from_numpy(random_rows(name, 3, 512, seed=3))
    _, scale, low, _ = byte_groups(rows, name)
    factors = scale_factors(rows, name)
    assert factors.sub_scale.dtype == torch.int8 and factored_exactly(factors, scale, low)
    assert (factors.sub_low is None) == (name in LOWS_OF_SCALES)

@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"])
def test_codes_of_at_most_7_bits_fit_byte_planes_and_come_back_whole(name):
    """GGUF's 2, 3, 5 and 6-bit codes (not Q8_0's bytes) fit the GPU kernel's byte planes, and the
    weights held so decode to what their groups hold (float16 scales and mins)."""
    from pagoda.layers.quantization.group_gemm import GroupQuantWeight, takes_byte_planes
    rows = random_rows(name, 3, 512, seed=2)
    codes, scale, low, group = byte_groups(torch.from_numpy(rows), name)
    assert takes_byte_planes(codes, group)
    planes = GroupQuantWeight(codes, scale, low, group, 8, planes=True)
    assert planes.codes.dtype == torch.int16 and planes.codes.shape == (256, 3)
    one_a_byte = GroupQuantWeight(codes, scale, low, group, 8, planes=False)
    assert torch.equal(planes.dequantize(torch.float32), one_a_byte.dequantize(torch.float32))
    q8_codes = byte_groups(torch.from_numpy(random_rows("Q8_0", 3, 512, seed=2)), "Q8_0")[0]
    assert not takes_byte_planes(q8_codes, 32)  # codes up to 255


def _first_tensors_by_type(tensors) -> dict[str, object]:
    found = {}
    for tensor in tensors:
        name = tensor.tensor_type.name
        if name in FORMATS and len(tensor.shape) == 2 and name not in found:
            found[name] = tensor
    return found


def test_real_tensors_of_the_pulled_models_decode_as_gguf_py_does(smollm2_dir, gemma3_270m_dir):
    checked = set()
    for directory in (smollm2_dir, gemma3_270m_dir):
        path = next(directory.glob("*.gguf"))
        index = read_tensor_index(path, directory / "gguf-tensors.json") or \
            read_gguf_tensors(path)
        for name, tensor in _first_tensors_by_type(index.tensors).items():
            rows = np.array(tensor.data[:64], copy=True)  # the first 64 rows are enough
            ours = dequantize_rows(torch.from_numpy(rows), name)
            assert torch.equal(ours, torch.from_numpy(gguf_py(rows, name))), name
            checked.add(name)
    assert {"Q4_1", "Q8_0", "Q4_K", "Q5_0", "Q6_K"} <= checked
