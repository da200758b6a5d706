"""Quantized weights' kernels on CUDA: the Triton group kernel against the dense product of
the decoded weights at the 8B's shapes, for every code layout, from one token (split inputs)
to a prefill chunk; GGUF k-quant blocks through it against their torch decoding (bit-exact
with gguf-py); FP8 on tensor cores (torch._scaled_mm) against the dense product; CUDA graphs
against eager. Checkpoints of each format end to end: test_quantized_checkpoints_gpu.py."""

from __future__ import annotations

import pytest
import torch

from pagoda import SamplingParams
from pagoda.layers.quantization.fp8 import runs_on_tensor_cores, scaled_mm
from pagoda.layers.quantization.gguf_blocks import byte_groups, dequantize_rows
from pagoda.layers.quantization.group_gemm import FP8, GroupQuantWeight
from pagoda.layers.quantization.triton_group_gemm import group_gemm
from pagoda.layers.tile_counters import nonzero_counters
from tests.layers.quantization.test_gguf_blocks import random_rows

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SHAPES = {"qkv": (6144, 4096), "down": (4096, 14336)}  # (outputs, inputs) of the 8B
# name -> (group (None: the whole row), bits, with a min, float8 values[, the mins held as
# integer zero points[, planes without their step words: scaled weight by weight[, codes
# 0..63 (GGUF Q6_K's) in byte planes, whose mins of -32 times the scale hold the scales in
# pairs in groups of 16[, mins half a step off the codes' centre: held as mins (step words
# in byte planes)[, 4-bit codes in halves, not planes (one token: the 4-bit GEMV)]]]]]).
# The mins centre the codes: 8-bit codes a byte each with mins of -128 times the scale are
# held without them, the zero point 128 shared (GGUF Q8_0's)
LAYOUTS = {"int4-g128": (128, 4, True, False), "int4-g32": (32, 4, True, False),
           "int4-g128-weight-by-weight": (128, 4, True, False, False, True),
           "int4-g32-weight-by-weight": (32, 4, True, False, False, True),
           "int4-g128-zero-points": (128, 4, True, False, True),
           "int4-g128-zero-points-weight-by-weight": (128, 4, True, False, True, True),
           "int4-g32-zero-points": (32, 4, True, False, True),
           "int4-g128-halves": (128, 4, True, False, False, False, False, False, True),
           "int8-g16": (16, 8, True, False), "int8-g32": (32, 8, True, False),
           "int8-g32-mins": (32, 8, True, False, False, False, False, True),
           "int6-g16-byte-planes": (16, 8, True, False, False, False, True),
           "int6-g16-byte-planes-weight-by-weight": (16, 8, True, False, False, True, True),
           "int6-g16-byte-planes-step-words": (16, 8, True, False, False, False, True, True),
           "int6-g32-byte-planes": (32, 8, True, False, False, False, True),
           "fp8-row": (None, 8, False, True), "fp8-block": (128, 8, False, True)}
TOKENS = (1, 16, 17, 32, 33, 64, 65, 300, 2048)  # the few-token kernel up to 32


def random_weight(outputs: int, inputs: int, group: int | None, bits: int, with_min: bool,
                  float8: bool, zero_points: bool = False, weight_by_weight: bool = False,
                  byte_planes: bool = False, off_grid_mins: bool = False,
                  halves: bool = False) -> GroupQuantWeight:
    group = group or inputs
    groups = inputs // group
    if float8:
        codes = (torch.randn(outputs, inputs, device="cuda") * 64).clamp(-448, 448).to(FP8)
        scale = torch.rand(outputs, groups, device="cuda") * 1e-4 + 1e-4
    else:
        codes = torch.randint(0, 64 if byte_planes else 2 ** bits, (outputs, inputs),
                              device="cuda", dtype=torch.uint8)
        scale = torch.rand(outputs, groups, device="cuda") * 2e-3 + 1e-3
    # mins centre the codes' range (byte planes hold 0..63 here)
    centre = (32 if byte_planes else 2 ** (bits - 1)) - (0.5 if off_grid_mins else 0)
    low = -centre * scale if with_min else None
    planes = True if byte_planes else False if halves else None
    weight = GroupQuantWeight(codes, scale, low, group, bits, planes=planes,
                              zero_points=zero_points, step_sums=not weight_by_weight)
    assert not (halves and weight.planes)
    pairs = byte_planes and group == 16 and not weight_by_weight and not off_grid_mins
    assert (weight.shared_zero == 32) == pairs
    assert weight.holds_zero_points == (zero_points or pairs)
    centred = bits == 8 and with_min and not float8 and not byte_planes and not off_grid_mins
    assert (weight.shared_zero == 128) == centred
    return weight


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_kernel_matches_the_dense_product(shape, layout, tokens, dtype, gpu_report):
    weight = random_weight(*SHAPES[shape], *LAYOUTS[layout])
    x = torch.randn(tokens, weight.in_features, device="cuda", dtype=dtype)
    expected = x.float() @ weight.dequantize(torch.float32).t()
    error = relative_error(group_gemm(x, weight), expected)
    gpu_report(shape=shape, layout=layout, tokens=tokens, dtype=str(dtype)[6:],
               error=f"{error:.2e}")
    assert error < 1e-2  # 16-bit weights and output


@pytest.mark.parametrize("decode_from", [0, 1])  # PAGODA_DECODE_FROM: never, always
@pytest.mark.parametrize("tokens", [300, 2048])
@pytest.mark.parametrize("layout", ["int4-g128", "int4-g32", "int4-g128-zero-points",
                                    "int6-g16-byte-planes", "int6-g32-byte-planes"])
def test_long_calls_on_planes_match_the_dense_product_either_way(layout, tokens, decode_from,
                                                                  monkeypatch, gpu_report):
    """Long calls decoded first (cuBLAS on a slice of weights at a time, several slices of
    the down product here) and in the planes kernel's large tiles."""
    from pagoda.layers.quantization import group_gemm as layouts
    from pagoda.layers.quantization import triton_plane_decode as decode
    monkeypatch.setattr(layouts, "DECODE_FROM_ALL", decode_from)
    monkeypatch.setattr(layouts, "DECODED_SLICE_BYTES", 16 << 20)
    weight = random_weight(*SHAPES["down"], *LAYOUTS[layout])
    assert decode.decodes_first(tokens, weight) == (decode_from == 1)
    x = torch.randn(tokens, weight.in_features, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ weight.dequantize(torch.float32).t()
    error = relative_error(group_gemm(x, weight), expected)
    gpu_report(layout=layout, tokens=tokens, decoded_first=decode_from == 1,
               error=f"{error:.2e}")
    assert error < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1",
                                  "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS"])
def test_gguf_blocks_through_the_kernel_match_their_decoding(name, dtype, gpu_report):
    rows = torch.from_numpy(random_rows(name, 256, 1024)).cuda()
    codes, scale, low, group = byte_groups(rows, name)
    bits = 4 if name in ("Q4_0", "Q4_1", "Q4_K") else 8
    weight = GroupQuantWeight(codes, scale, low, group, bits)
    x = torch.randn(5, 1024, device="cuda").to(dtype)
    expected = x.float() @ dequantize_rows(rows, name).t()
    error = relative_error(group_gemm(x, weight), expected)
    gpu_report(type=name, dtype=str(dtype)[6:], error=f"{error:.2e}")
    assert error < (1e-3 if dtype == torch.float32 else 1e-2)  # float16 scales and mins


@pytest.mark.parametrize("tokens", [1, 16, 40, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_with_factored_scales_match_their_decoding(name, dtype, tokens, monkeypatch,
                                                            gpu_report):
    """PAGODA_PLANE_FACTORED_SCALES=1: the k-quants' scales held as their blocks store
    them, in every path of the planes kernel (a plane's or step's sums at 1 and 16 tokens,
    weight by weight at 40 and Q4_K's 300, byte planes decoded first at 300), against
    gguf-py's decoding."""
    from pagoda.layers.quantization import group_gemm as held
    from pagoda.layers.quantization.gguf_blocks import scale_factors
    monkeypatch.setattr(held, "FACTORED_SCALES_IN_PLANES", True)
    rows = torch.from_numpy(random_rows(name, 256, 1024)).cuda()
    codes, scale, low, group = byte_groups(rows, name)
    bits = 4 if name == "Q4_K" else 8
    weight = GroupQuantWeight(codes, scale, low, group, bits,
                              factors=scale_factors(rows, name))
    assert weight.factored and weight.sub_words.is_cuda
    x = torch.randn(tokens, 1024, device="cuda").to(dtype)
    expected = x.float() @ dequantize_rows(rows, name).t()
    error = relative_error(group_gemm(x, weight), expected)
    gpu_report(type=name, dtype=str(dtype)[6:], tokens=tokens, error=f"{error:.2e}")
    assert error < (1e-5 if dtype == torch.float32 else 1e-2)
    assert nonzero_counters() == 0


@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"])
def test_gguf_codes_of_at_most_7_bits_in_byte_planes_match_their_decoding(name, dtype, tokens,
                                                                         gpu_report):
    rows = torch.from_numpy(random_rows(name, 256, 1024)).cuda()
    codes, scale, low, group = byte_groups(rows, name)
    weight = GroupQuantWeight(codes, scale, low, group, 8, planes=True)
    assert weight.codes.dtype == torch.int16
    x = torch.randn(tokens, 1024, device="cuda").to(dtype)
    expected = x.float() @ dequantize_rows(rows, name).t()
    error = relative_error(group_gemm(x, weight), expected)
    gpu_report(type=name, dtype=str(dtype)[6:], tokens=tokens, error=f"{error:.2e}")
    assert error < (1e-3 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_a_qkv_of_mixed_gguf_types_stores_each_kernel_into_its_columns(tokens, gpu_report):
    """A Q4_K_M file's qkv on the GPU (q and k in Q4_K, v in Q6_K: two kernels): each
    kernel's product stored into its columns of one output, bit for bit what the kernel
    returns alone, and against gguf-py's decoding."""
    from pagoda.layers.linear import QKVParallelLinear
    from pagoda.layers.quantization.gguf import GGUFLinearMethod, GGUFWeight
    layer = QKVParallelLinear(1024, 128, 8, 2, method=GGUFLinearMethod()).cuda()
    pieces = [random_rows(kind, rows, 1024, seed) for kind, rows, seed in
              (("Q4_K", 1024, 1), ("Q4_K", 256, 2), ("Q6_K", 256, 3))]
    for shard, (kind, rows) in enumerate(zip(("Q4_K", "Q4_K", "Q6_K"), pieces)):
        layer.weight.weight_loader(layer.weight, GGUFWeight(torch.from_numpy(rows), kind, 1024),
                                   shard)
    layer.method.process_weights_after_loading(layer)
    assert [k.bits for k in layer.gguf_kernels] == [4, 8]
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert torch.equal(y, torch.cat([kernel(x) for kernel in layer.gguf_kernels], -1))
    reference = torch.cat([dequantize_rows(torch.from_numpy(rows).cuda(), kind) for kind, rows
                           in zip(("Q4_K", "Q4_K", "Q6_K"), pieces)])
    error = relative_error(y, x.float() @ reference.t())
    gpu_report(tokens=tokens, error=f"{error:.2e}")
    assert error < 1e-2


@pytest.mark.parametrize("layout", ["int4-planes-g128-words", "int4-planes-g32",
                                    "int4-planes-zero-points", "bytes-planes-g16-words",
                                    "bytes-each-g32"])
def test_a_tables_lookup_in_one_launch_decodes_as_torch_does(layout):
    """GroupQuantWeight.rows on CUDA (triton_rows, one launch) against its torch decoding of
    the same rows on CPU, float32 (the kernel may fuse a multiply and an add) and in the
    activations' type."""
    from tests.layers.quantization.test_triton_rows import LAYOUTS, layout_weight
    weight = layout_weight(*LAYOUTS[layout], torch.Generator().manual_seed(0))
    index = torch.tensor([3, 0, weight.out_features - 1, 3])
    dtypes = (torch.float32, torch.bfloat16)
    expected = [weight.rows(index, 2.5, dtype) for dtype in dtypes]  # (on CPU: torch)
    weight.cuda()
    for dtype, torch_rows in zip(dtypes, expected, strict=True):
        got = weight.rows(index.cuda(), 2.5, dtype)
        assert got.dtype == dtype and got.is_cuda
        torch.testing.assert_close(got.cpu().float(), torch_rows.float(), atol=1e-7,
                                   rtol=1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("tokens", [33, 65, 300, 2048])
def test_fp8_tensor_cores_match_the_dense_product(tokens, gpu_report):
    weight = random_weight(*SHAPES["qkv"], *LAYOUTS["fp8-row"])
    x = torch.randn(tokens, weight.in_features, device="cuda", dtype=torch.bfloat16)
    assert runs_on_tensor_cores(x, weight)
    expected = x.float() @ weight.dequantize(torch.float32).t()
    error = relative_error(scaled_mm(x, weight), expected)
    gpu_report(tokens=tokens, path="torch._scaled_mm", error=f"{error:.2e}")
    assert error < 5e-2  # activations rounded to float8 (3 mantissa bits) per token


@pytest.mark.parametrize("shape", ["qkv", "down"])
@pytest.mark.parametrize("tokens", [33, 64, 256, 300, 512])
@pytest.mark.parametrize("splits", [None, 1, 2, 4])
def test_the_triton_fp8_product_matches_cublas(shape, tokens, splits, gpu_report):
    """pagoda's FP8 tensor-core kernel against torch._scaled_mm on the same float8 operands
    (both with fast accumulation), at its own configuration and at each input split, eager
    and replayed in a graph; every tile counter left zero."""
    from pagoda.layers.quantization.triton_fp8_gemm import fp8_config, fp8_gemm
    from pagoda.layers.quantization.triton_group_gemm import multiprocessor_count
    weight = random_weight(*SHAPES[shape], *LAYOUTS["fp8-row"])
    a = (torch.randn(tokens, weight.in_features, device="cuda") * 0.5).to(FP8)
    a_scale = torch.rand(tokens, 1, device="cuda") + 0.5
    config = fp8_config(tokens, weight.out_features, weight.in_features,
                        multiprocessor_count(torch.cuda.current_device()))
    if splits is not None:
        config["splits"] = splits
    got = fp8_gemm(a, a_scale, weight.codes, weight.scale, torch.bfloat16, config)
    expected = (a.float() @ weight.codes.float().t()) * a_scale * weight.scale
    cublas = torch._scaled_mm(a, weight.codes.t(), scale_a=a_scale, scale_b=weight.scale,
                              out_dtype=torch.bfloat16, use_fast_accum=True)
    error, cublas_error = relative_error(got, expected), relative_error(cublas, expected)
    gpu_report(shape=shape, tokens=tokens, config=str(config), error=f"{error:.2e}",
               cublas_error=f"{cublas_error:.2e}")
    assert error < max(2 * cublas_error, 1e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = fp8_gemm(a, a_scale, weight.codes, weight.scale, torch.bfloat16, config)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, got)  # partial sums added in split order
    assert nonzero_counters() == 0


def test_fp8_products_of_33_to_64_tokens_take_the_triton_kernel(monkeypatch):
    from pagoda.layers.quantization import triton_fp8_gemm
    weight = random_weight(*SHAPES["down"], *LAYOUTS["fp8-row"])
    calls = []
    monkeypatch.setattr(triton_fp8_gemm, "fp8_gemm", lambda a, *rest, **k: calls.append(a) or
                        torch.zeros(a.shape[0], weight.out_features, device="cuda",
                                    dtype=torch.bfloat16))
    for tokens in (33, 64, 65, 256):
        scaled_mm(torch.randn(tokens, weight.in_features, device="cuda",
                              dtype=torch.bfloat16), weight)
    assert [a.shape[0] for a in calls] == [33, 64]
    monkeypatch.setattr(triton_fp8_gemm, "CHOSEN", "cublas")  # PAGODA_FP8_GEMM=cublas
    scaled_mm(torch.randn(48, weight.in_features, device="cuda", dtype=torch.bfloat16), weight)
    monkeypatch.setattr(triton_fp8_gemm, "CHOSEN", "triton")
    scaled_mm(torch.randn(256, weight.in_features, device="cuda", dtype=torch.bfloat16),
              weight)
    assert [a.shape[0] for a in calls] == [33, 64, 256]


@pytest.mark.parametrize("layout", ["fp8-row", "fp8-block", "int8-g32", "int8-g32-mins"])
def test_few_token_products_in_float16_clamp_activations_past_its_range(layout):
    """The few-token kernel multiplies float8 values and 8-bit codes in float16: a bfloat16
    activation past float16's range counts as +-65504 (not infinity), and the rest are
    exact."""
    weight = random_weight(*SHAPES["qkv"], *LAYOUTS[layout])
    x = torch.randn(3, weight.in_features, device="cuda", dtype=torch.bfloat16)
    x[0, 5], x[2, 100] = 2e5, -1e6
    got = group_gemm(x, weight)
    assert torch.isfinite(got).all()
    expected = x.float().clamp(-65504, 65504) @ weight.dequantize(torch.float32).t()
    assert relative_error(got, expected) < 1e-2


def test_fp8_rows_round_as_torch_does():
    from pagoda.layers.quantization.fp8 import FP8_MAX
    from pagoda.layers.quantization.triton_group_gemm import fp8_rows
    x = torch.randn(300, 14336, device="cuda", dtype=torch.bfloat16) * 3
    values, scale = fp8_rows(x, FP8_MAX)
    expected_scale = (x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
    expected = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("layout", ["int4-g32", "int4-g128-zero-points", "int8-g16",
                                    "fp8-block", "fp8-row"])
def test_graphs_replay_the_eager_products(layout):
    weight = random_weight(*SHAPES["down"], *LAYOUTS[layout])
    for tokens in (1, 16, 128):
        x = torch.randn(tokens, weight.in_features, device="cuda", dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            group_gemm(x, weight)  # compiles outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = group_gemm(x, weight)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(captured, group_gemm(x, weight), rtol=0, atol=0)


@pytest.mark.parametrize("kind", [1, 2])
@pytest.mark.parametrize("tokens", [1, 8, 32])
@pytest.mark.parametrize("layout", ["int4-g128-zero-points", "int4-g32", "int6-g16-byte-planes",
                                    "fp8-row", "fp8-block", "int8-g16", "int4-g128-halves"])
def test_the_gated_activation_in_the_gate_up_product_changes_no_bit(layout, tokens, kind):
    """The 8B's gate-up product applying SiLU (1) or GELU (2) gating to its outputs rounds
    them as the separate kernel does: the same bits as the activation launched after it.
    One token of 4-bit halves or bytes, on the one-token GEMV, comes within rounding of it:
    on an H100 (SiLU) 647 of 14,336 outputs of bytes differed (5.7e-4 of the norm) and 38
    of 4-bit halves (8.6e-5). Why was not found: compiled for sm_90, the two forms issue
    the same float opcodes in the same order but for the activation's (the separate
    kernel's; operands not compared), and under the interpreter they agree bit for bit."""
    from pagoda.layers.activation import GeluTanhAndMul, SiluAndMul
    activation = {1: SiluAndMul(), 2: GeluTanhAndMul()}[kind]
    weight = random_weight(2 * 14336, 4096, *LAYOUTS[layout])
    x = torch.randn(tokens, weight.in_features, device="cuda", dtype=torch.bfloat16)
    got = weight.gated(x, activation)
    assert got is not None and got.shape == (tokens, 14336)
    expected = activation(group_gemm(x, weight))
    if tokens == 1 and weight.has_one_token_kernel:
        assert relative_error(got, expected.float()) < 2e-3
        return
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("layout", ["int4-g128", "int4-g128-zero-points", "int8-g32",
                                    "fp8-row"])
def test_split_sums_are_the_same_on_every_call(layout, tokens):
    """Split inputs are added by whichever program of a tile finishes last, in split order:
    repeated calls (shapes with many splits, interleaved) give identical bits, and the
    counters are back at zero after."""
    calls = []
    for outputs, inputs in (*SHAPES.values(), (28672, 4096), (4096, 4096)):
        weight = random_weight(outputs, inputs, *LAYOUTS[layout])
        calls.append((torch.randn(tokens, inputs, device="cuda", dtype=torch.bfloat16), weight))
    first = [group_gemm(x, weight) for x, weight in calls]
    for _ in range(100):
        for (x, weight), expected in zip(calls, first):
            assert torch.equal(group_gemm(x, weight), expected)
    torch.cuda.synchronize()
    assert nonzero_counters() == 0
