"""pagoda's CPU block-dot kernel, each build (AVX-512 VNNI, AVX2), against a torch reference
of its arithmetic (activations rounded to int8 per block of 32 at 1/127 of the block's
largest, in one or two passes; weights code * scale + low per group): 4-, 6- and 8-bit codes
(byte codes narrowed to the fewest bits that hold them),
groups of 16 to 384, token counts around its 8-row tiles, threads, float16 scales, factored
scales (int8 times a float a super-block: GGUF's k-quants'), a bias, products written into a
wider output's columns; its table lookup; the shapes it refuses; and the machines it does not
build on."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.quantization import cpu_block_dot
from pagoda.layers.quantization.cpu_block_dot import BlockDotWeight, ScaleFactors
from tests.utils import on_thread_counts


@pytest.fixture(autouse=True, params=list(cpu_block_dot.BUILDS))
def build(request, monkeypatch):
    """Each build of the kernel this CPU runs (the AVX2 one runs on AVX-512 CPUs too)."""
    monkeypatch.setenv("PAGODA_CPU_BLOCK_DOT", request.param)
    cpu_block_dot._library.cache_clear()
    if not cpu_block_dot.available():
        pytest.skip(f"the {request.param} build of the block-dot kernel does not run here")
    yield request.param
    cpu_block_dot._library.cache_clear()


def quantized_activations(x: torch.Tensor, passes: int = 1, lowest: int = -128
                          ) -> torch.Tensor:
    """x as the kernel sees it: per block of 32, codes round(x / scale) (ties to even) at
    scale = max |x| / 127, times the scale; a second pass adds what the first missed, in
    codes of scale / 256 (no lower than `lowest`)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round(blocks * inverse)
    if passes == 2:
        rest = blocks - codes * scale
        codes = codes + torch.round(rest * (inverse * 256)).clamp(lowest, 127) / 256
    return (codes * scale).reshape(x.shape)


def random_weights(out_features: int, in_features: int, group: int, bits: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, low, the weights they stand for)."""
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // group
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=gen,
                          dtype=torch.uint8)
    scale = torch.rand(out_features, groups, generator=gen) * 0.02 + 1e-3
    low = torch.randn(out_features, groups, generator=gen) * 0.05
    weights = codes.float() * scale.repeat_interleave(group, 1) \
        + low.repeat_interleave(group, 1)
    return codes, scale, low, weights


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("out_features, in_features, group", [
    (48, 64, 32), (160, 256, 128), (32, 512, 256), (96, 384, 384), (64, 128, 16)])
@pytest.mark.parametrize("tokens", [1, 7, 8, 19])
@pytest.mark.parametrize("passes", [1, 2])
def test_products_match_the_reference_arithmetic(bits, out_features, in_features, group,
                                                 tokens, passes):
    codes, scale, low, weights = random_weights(out_features, in_features, group, bits, 0)
    layer = BlockDotWeight(codes, scale, low, group, bits, activation_passes=passes)
    # (activations of their own seed: drawn from the global one they depended on the tests
    # run before in the same process)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(tokens))
    x[0, 32:64] = 0  # a block of zeros: scale 0, no division by it
    expected = quantized_activations(x, passes).double() @ weights.double().t()
    # float32 sums; with two passes a second-pass code may also land one step apart (the
    # kernel may compute what the first pass missed with one rounding less: a step is
    # 1/32512 of its block's largest)
    share = 2e-6 if passes == 1 else 2e-5
    torch.testing.assert_close(layer(x).double(), expected, rtol=0,
                               atol=share * expected.abs().max().item())


def test_second_pass_codes_at_the_bottom_of_int8_with_byte_codes(build):
    """Rests just under minus half a step give second-pass activation codes of -128 (-127
    on the AVX2 build, which multiplies byte codes less 128 as a magnitude and x with their
    sign: x = -128 has no negation), against byte codes 0 and 255 among others: the
    products are the reference's at the build's codes."""
    codes, scale, low, weights = random_weights(32, 64, 32, 8, 5)
    codes[:, ::3], codes[:, 1::3] = 0, 255
    weights = codes.float() * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)
    layer = BlockDotWeight(codes, scale, low, 32, 8, activation_passes=2)
    x = torch.full((2, 64), -0.004995)  # a step of 0.01: first codes 0, rests -127.87 / 256
    x[:, 0], x[1, 1::2] = 1.27, 0.004995
    expected = quantized_activations(x, 2, -127 if build == "avx2" else -128).double() \
        @ weights.double().t()
    torch.testing.assert_close(layer(x).double(), expected, rtol=0,
                               atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("out_features, in_features, group", [
    (48, 64, 32), (32, 512, 256), (64, 128, 16)])
@pytest.mark.parametrize("tokens", [1, 19])
def test_float16_scales_give_the_float32_products(bits, out_features, in_features, group,
                                                  tokens):
    codes, scale, low, _ = random_weights(out_features, in_features, group, bits, 4)
    scale, low = scale.half().float(), low.half().float()  # float16's values: held exactly
    wide = BlockDotWeight(codes, scale, low, group, bits)
    half = BlockDotWeight(codes, scale, low, group, bits, half_scales=True)
    assert wide.scale.dtype == torch.float32 and half.scale.dtype == half.low.dtype == \
        torch.float16
    assert half.kernel_name() == cpu_block_dot.kernel_name(bits, 2, half_scales=True)
    x = torch.randn(tokens, in_features)
    assert torch.equal(half(x), wide(x))
    index = torch.tensor([0, out_features - 1, 5])
    assert torch.equal(half.rows(index), wide.rows(index))


def test_scales_float16_cannot_hold_stay_float32():
    codes, scale, low, _ = random_weights(32, 64, 32, 4, 5)  # random float32s
    assert BlockDotWeight(codes, scale, low, 32, 4, half_scales=True).scale.dtype == \
        torch.float32
    scale = scale.half().float()
    low = torch.full_like(scale, -1e5)  # past float16's largest
    assert BlockDotWeight(codes, scale, low, 32, 4, half_scales=True).low.dtype == \
        torch.float32


def test_leading_dimensions_and_dtypes_are_kept():
    codes, scale, low, weights = random_weights(64, 128, 64, 4, 1)
    layer = BlockDotWeight(codes, scale, low, 64, 4)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    expected = quantized_activations(x.float().reshape(6, 128), layer.activation_passes) \
        @ weights.t()
    torch.testing.assert_close(y.float().reshape(6, 64), expected, rtol=1e-2, atol=1e-2)


def test_threads_split_the_outputs_without_changing_a_bit():
    codes, scale, low, _ = random_weights(256, 512, 128, 4, 2)
    layer = BlockDotWeight(codes, scale, low, 128, 4)
    x = torch.randn(70, 512)  # >= 64 tokens: the activations are quantized in parallel too
    one, four = on_thread_counts(lambda: layer(x), (1, 4))
    assert torch.equal(one, four)


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("group", [16, 32, 128])
@pytest.mark.parametrize("half_scales", [False, True])
def test_rows_decode_to_the_weights_exactly(bits, group, half_scales):
    codes, scale, low, weights = random_weights(64, 256, group, bits, 3)
    if half_scales:
        scale, low = scale.half().float(), low.half().float()
        weights = codes.float() * scale.repeat_interleave(group, 1) \
            + low.repeat_interleave(group, 1)
    layer = BlockDotWeight(codes, scale, low, group, bits, half_scales=half_scales)
    index = torch.tensor([0, 17, 63, 17, 40])
    assert torch.equal(layer.rows(index), weights[index])  # the kernel's lookup
    assert torch.equal(layer.decoded_rows(index), weights[index])  # its torch reference
    scale = float(torch.tensor(640 ** 0.5))  # Gemma 3 270M's embedding scale
    assert torch.equal(layer.rows(index, scale), weights[index] * scale)


def random_factors(out_features: int, groups: int, groups_per_super: int, own_lows: bool,
                   seed: int) -> ScaleFactors:
    """Sub-scales and sub-lows in int8's range, float16-valued factors (as GGUF's d and
    dmin); without own lows each low is -32 times its scale (Q6_K's)."""
    gen = torch.Generator().manual_seed(seed)
    supers = groups // groups_per_super

    def factor(sign: float) -> torch.Tensor:
        return (sign * (torch.rand(out_features, supers, generator=gen) * 1e-3 + 1e-5)
                ).half().float()
    sub_scale = torch.randint(-128, 128, (out_features, groups), generator=gen).to(torch.int8)
    sub_low = torch.randint(0, 64, (out_features, groups), generator=gen).to(torch.int8) \
        if own_lows else None
    scale_factor = factor(1.0)
    low_factor = -factor(1.0) if own_lows else -32.0 * scale_factor
    return ScaleFactors(sub_scale, sub_low, scale_factor, low_factor, groups_per_super)


@pytest.mark.parametrize(("bits", "group", "own_lows"), [(4, 32, True), (6, 32, True),
                                                         (6, 16, False), (4, 16, True),
                                                         (8, 16, False)])
@pytest.mark.parametrize("tokens", [1, 7, 19])
@pytest.mark.parametrize("passes", [1, 2])
def test_factored_scales_give_the_float32_products_to_the_bit(bits, group, own_lows, tokens,
                                                              passes):
    """Q4_K's layout (4-bit, groups of 32, sub-mins), Q5_K's (6-bit), Q6_K's (6-bit, groups
    of 16, lows of the scales), Q2_K's (4-bit, groups of 16) and the same with byte codes:
    the products of the plain
    kernel holding the factors' float32 products, bit for bit, and the lookups too."""
    out_features, in_features = 48, 512
    groups = in_features // group
    factors = random_factors(out_features, groups, 256 // group, own_lows, 5)
    scale, low = factors.products()
    codes = random_weights(out_features, in_features, group, bits, 4)[0]
    factored = BlockDotWeight(codes, scale, low, group, bits, passes, factors=factors)
    plain = BlockDotWeight(codes, scale, low, group, bits, passes)
    assert factored.factored and not plain.factored
    held = {name: p.numel() * p.element_size() for name, p in factored.named_parameters()}
    # int8 sub-scales (and sub-lows), two float32 factors per 256 inputs
    assert held["scale"] == out_features * groups
    assert ("low" in held) == own_lows  # (one parameter where the sub-scales serve both)
    assert held["factors"] == out_features * (in_features // 256) * 2 * 4
    x = torch.randn(tokens, in_features)
    assert torch.equal(factored(x), plain(x))
    index = torch.tensor([0, 17, 47, 17])
    assert torch.equal(factored.rows(index), plain.rows(index))
    assert torch.equal(factored.decoded_rows(index), plain.decoded_rows(index))


@pytest.mark.parametrize(("top", "bits", "row_bytes"), [(15, 4, 128), (63, 6, 192),
                                                       (255, 8, 256)])
def test_byte_codes_are_held_in_the_fewest_bits_that_hold_them(top, bits, row_bytes):
    """Byte codes up to `top` (Q2_K's and Q3_K's up to 15, Q5's and Q6_K's up to 63) held
    as nibbles, as nibbles and high pairs, or as bytes: the packed bytes a row of 256 inputs,
    and the products and lookups of the codes they stand for."""
    codes, scale, low, weights = random_weights(32, 256, 32, 8, 8)
    codes = (codes.int() % (top + 1)).to(torch.uint8)
    weights = codes.float() * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)
    layer = BlockDotWeight(codes, scale, low, 32, 8, activation_passes=1)
    assert layer.bits == bits
    assert layer.packed.numel() == 32 * row_bytes
    x = torch.randn(5, 256)
    expected = quantized_activations(x).double() @ weights.double().t()
    torch.testing.assert_close(layer(x).double(), expected, rtol=0,
                               atol=2e-6 * expected.abs().max().item())
    index = torch.tensor([0, 31, 9])
    assert torch.equal(layer.rows(index), weights[index])


def test_factors_whose_products_are_not_the_scales_are_not_held():
    """A kernel given factors that do not multiply to its scales holds the scales."""
    factors = random_factors(32, 8, 8, True, 6)
    scale, low = factors.products()
    codes = random_weights(32, 256, 32, 4, 7)[0]
    layer = BlockDotWeight(codes, scale * 1.5, low, 32, 4, factors=factors)
    assert not layer.factored and layer.scale.dtype == torch.float32


@pytest.mark.parametrize("tokens", [1, 9])
def test_a_bias_is_added_as_torch_adds_it(tokens):
    codes, scale, low, _ = random_weights(48, 64, 32, 8, 8)
    layer = BlockDotWeight(codes, scale, low, 32, 8)
    x, bias = torch.randn(tokens, 64), torch.randn(48)
    assert torch.equal(layer(x, bias=bias), layer(x) + bias)


@pytest.mark.parametrize("tokens", [1, 9])
def test_products_land_in_the_columns_of_a_wider_output(tokens):
    codes, scale, low, _ = random_weights(32, 128, 32, 4, 6)
    layer = BlockDotWeight(codes, scale, low, 32, 4)
    x = torch.randn(tokens, 128)
    wide = torch.full((tokens, 80), 7.0)
    assert layer(x, out=wide[:, 16:48]) is not None
    assert torch.equal(wide[:, 16:48], layer(x))
    assert bool((wide[:, :16] == 7).all() and (wide[:, 48:] == 7).all())


@pytest.mark.parametrize("out_features, in_features, group", [
    (40, 64, 32),    # outputs not whole tiles of 16
    (48, 80, 16),    # inputs not whole blocks of 32
    (48, 96, 48),    # groups of neither 16 nor a multiple of 32
    (48, 96, 64),    # a group that does not divide the inputs
])
def test_shapes_it_cannot_hold_are_refused(out_features, in_features, group):
    assert not cpu_block_dot.fits(out_features, in_features, group)
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    groups = torch.ones(out_features, max(in_features // group, 1))
    with pytest.raises(ValueError, match="no block-dot kernel"):
        BlockDotWeight(codes, groups, groups, group, 4)


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])
def test_without_a_working_compiler_it_is_unavailable(compiler, monkeypatch, tmp_path, caplog):
    """A missing compiler, or one that fails: the kernel is unavailable (the layers use
    torch's kernels) and the log says why."""
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    cpu_block_dot._library.cache_clear()
    try:
        with caplog.at_level("INFO", logger=cpu_block_dot.__name__):
            assert not cpu_block_dot.available()
    finally:
        cpu_block_dot._library.cache_clear()
    assert "torch's kernels" in caplog.text
    assert not list(tmp_path.glob("kernels/*.so"))


def test_it_builds_once_into_pagodas_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    cpu_block_dot._library.cache_clear()
    try:
        assert cpu_block_dot.available()
        built = list(tmp_path.glob("kernels/cpu_block_dot-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_block_dot._library.cache_clear()
        assert cpu_block_dot.available()
        assert built[0].stat().st_mtime_ns == stamp  # found, not rebuilt
    finally:
        cpu_block_dot._library.cache_clear()


def test_the_environment_picks_one_or_two_activation_passes(monkeypatch):
    codes, scale, low, _ = random_weights(32, 64, 32, 4, 4)
    assert BlockDotWeight(codes, scale, low, 32, 4).activation_passes == 2  # the default
    monkeypatch.setenv(cpu_block_dot.PASSES_VARIABLE, "1")
    layer = BlockDotWeight(codes, scale, low, 32, 4)
    assert layer.activation_passes == 1
    assert layer.kernel_name() == "cpu_block_dot (4-bit codes, 1-pass activations)"
    monkeypatch.setenv(cpu_block_dot.PASSES_VARIABLE, "3")
    with pytest.raises(ValueError, match="must be 1 or 2"):
        BlockDotWeight(codes, scale, low, 32, 4)
