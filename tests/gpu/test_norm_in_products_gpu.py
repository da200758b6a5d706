"""An RMSNorm done by the quantized products around it on CUDA (`norm.product_then_norm`):
the first product stores the new residual and the normed rows but for their rms, the next
divides its sums by it.

- At the 8B's output and gate-up shapes, for each code layout the kernels hold, at 1-32
  tokens: the new residual is bit for bit what the norm's own kernel stores, the gated
  outputs within bfloat16's rounding of the norm launched between the products; CUDA graphs
  replay the pair bit for bit, and repeated calls give the same bits.
- End to end, an AWQ model (float32) decodes the same greedy tokens with the norm in its
  products as with the norm's own launch, and runs it so in every layer."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.activation import SiluAndMul
from pagoda.layers.norm import RMSNorm
from pagoda.layers.quantization.group_gemm import GroupQuantWeight
from pagoda.layers.quantization.triton_group_gemm import group_gemm
from pagoda.layers.tile_counters import nonzero_counters
from tests.gpu.test_quantized_checkpoints_gpu import greedy
from tests.gpu.test_quantized_gpu import LAYOUTS, random_weight, relative_error
from tests.models.parity import random_prompts
from tests.models.test_quantized_checkpoints import CONFIG, write_quantized
from tests.utils import save_random_checkpoint

NORMED_LAYOUTS = ["int4-g128-zero-points", "int4-g128", "int4-g32", "int6-g16-byte-planes",
                  "fp8-row", "fp8-block", "int8-g16", "int4-g128-halves"]


def _weight(outputs: int, inputs: int, layout: str) -> GroupQuantWeight:
    """Random codes in `layout`; byte planes' 0..63 with mins of -32 scales (random_weight's
    -128 make every weight negative, and the gate-up outputs overflow float16)."""
    if layout != "int6-g16-byte-planes":
        return random_weight(outputs, inputs, *LAYOUTS[layout])
    codes = torch.randint(0, 64, (outputs, inputs), device="cuda", dtype=torch.uint8)
    scale = torch.rand(outputs, inputs // 16, device="cuda") * 2e-3 + 1e-3
    return GroupQuantWeight(codes, scale, -32 * scale, 16, 8, planes=True)


def _pair(layout: str) -> tuple[GroupQuantWeight, GroupQuantWeight, RMSNorm]:
    """The 8B's output projection, its gate-up projection (random codes) and a norm of
    random weights between them."""
    norm = RMSNorm(4096, 1e-5).cuda()
    norm.weight.data = (torch.rand(4096, device="cuda") + 0.5).to(torch.bfloat16)
    return _weight(4096, 4096, layout), _weight(2 * 14336, 4096, layout), norm


def _normed_pair(first: GroupQuantWeight, second: GroupQuantWeight, norm: RMSNorm,
                 x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    done = first.then_norm(x, residual, norm.weight, norm.eps)
    assert done is not None
    rows, new_residual = done
    gated = second.normed(rows, SiluAndMul())
    assert gated is not None
    return gated, new_residual


@pytest.mark.parametrize("tokens", [1, 8, 32])
@pytest.mark.parametrize("layout", NORMED_LAYOUTS)
def test_a_norm_in_the_products_matches_its_own_launch(layout, tokens, gpu_report):
    first, second, norm = _pair(layout)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16) * 4
    normed, expected_residual = norm(group_gemm(x, first), residual)
    expected = second.gated(normed, SiluAndMul())
    got, got_residual = _normed_pair(first, second, norm, x, residual)
    assert torch.equal(got_residual, expected_residual)
    error = relative_error(got, expected.float())
    gpu_report(layout=layout, tokens=tokens, error=f"{error:.2e}")
    assert error < 1e-2


@pytest.mark.parametrize("layout", ["int4-g128-zero-points", "fp8-row"])
def test_graphs_replay_a_norm_in_the_products_and_calls_repeat_its_bits(layout):
    first, second, norm = _pair(layout)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _normed_pair(first, second, norm, x, residual)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _normed_pair(first, second, norm, x, residual)
    x.copy_(torch.randn_like(x))
    residual.copy_(torch.randn_like(residual))
    graph.replay()
    eager = _normed_pair(first, second, norm, x, residual)
    for _ in range(20):
        again = _normed_pair(first, second, norm, x, residual)
        assert all(torch.equal(a, b) for a, b in zip(again, eager))
    assert all(torch.equal(a, b) for a, b in zip(captured, eager))
    torch.cuda.synchronize()
    assert nonzero_counters() == 0


def test_an_awq_model_decodes_the_same_tokens_with_the_norm_in_its_products(tmp_path,
                                                                              monkeypatch,
                                                                              gpu_report):
    from pagoda.layers import norm as norms
    source = save_random_checkpoint(CONFIG, tmp_path / "fp32", None)
    write_quantized(source, tmp_path / "awq", tmp_path / "reference", "awq")
    prompts = random_prompts(CONFIG.vocab_size, (7, 19, 40))
    normed = []
    real = GroupQuantWeight.then_norm

    def counted(weight, *args, **kwargs):
        done = real(weight, *args, **kwargs)
        normed.append(done is not None)
        return done
    monkeypatch.setattr(GroupQuantWeight, "then_norm", counted)
    monkeypatch.setattr(norms, "NORM_IN_PRODUCTS", "1")
    with_norm = greedy(tmp_path / "awq", prompts)
    assert normed and all(normed)
    monkeypatch.setattr(norms, "NORM_IN_PRODUCTS", "0")
    launched = len(normed)
    without = greedy(tmp_path / "awq", prompts)
    assert len(normed) == launched  # the norm's own launch
    same = sum(a == b for got, ref in zip(with_norm, without) for a, b in zip(got, ref))
    rate = same / sum(len(tokens) for tokens in without)
    gpu_report(agreement=f"{rate:.3f}")
    assert rate >= 0.95
