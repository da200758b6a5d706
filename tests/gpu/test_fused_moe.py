"""The Triton MoE kernel against the torch reference at real widths, bf16: token counts
1...8192, expert counts 8...128, top-k 1...8; an expert range (expert parallelism); the
whole layer (router + kernel); the kernel captured in a CUDA graph against eager
(device only)."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.moe.layer import FusedMoE
from pagoda.layers.moe.native import fused_moe_native
from pagoda.layers.moe.triton_moe import fused_moe_triton
from tests.layers.moe_cases import kernel_error, random_moe

BF16_TOL = 2e-2  # relative to 1 + max |reference|: bf16 rows, float32 accumulation
QWEN3_30B = (2048, 768)  # hidden, one expert's intermediate size
MIXTRAL = (4096, 14336)
TOKENS = [1, 2, 7, 16, 33, 128, 255, 1024, 4096, 8192]
ROUTING = [(8, 1), (8, 2), (60, 4), (128, 8)]  # (experts, top_k)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize(("experts", "top_k"), ROUTING, ids=[f"e{e}k{k}" for e, k in ROUTING])
def test_kernel_matches_torch_bf16(tokens, experts, top_k, gpu_report):
    error = kernel_error(tokens, experts, top_k, *QWEN3_30B, torch.bfloat16, "cuda")
    gpu_report(tokens=tokens, experts=experts, top_k=top_k, shape="qwen3-30b", error=error)
    assert error < BF16_TOL


@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_kernel_matches_torch_at_mixtral_width(tokens, gpu_report):
    error = kernel_error(tokens, 8, 2, *MIXTRAL, torch.bfloat16, "cuda")
    gpu_report(tokens=tokens, experts=8, top_k=2, shape="mixtral", error=error)
    assert error < BF16_TOL


@pytest.mark.parametrize("tokens", [1, 300])
def test_kernel_with_experts_on_another_rank(tokens, gpu_report):
    error = kernel_error(tokens, 64, 8, *QWEN3_30B, torch.bfloat16, "cuda", drop_experts=True)
    gpu_report(tokens=tokens, experts=64, top_k=8, shape="half the experts", error=error)
    assert error < BF16_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 100])
def test_layer_routes_and_runs_like_the_torch_path(dtype, tokens):
    layer = FusedMoE(16, 4, 256, 128, renormalize=True).to(device="cuda", dtype=dtype)
    torch.nn.init.normal_(layer.gate_up_proj, std=256 ** -0.5)
    torch.nn.init.normal_(layer.down_proj, std=128 ** -0.5)
    x = torch.randn(tokens, 256, device="cuda", dtype=dtype)
    logits = torch.randn(tokens, 16, device="cuda", dtype=dtype)
    ours, ref = layer.forward_cuda(x, logits).float(), layer.forward_native(x, logits).float()
    tol = 1e-4 if dtype == torch.float32 else BF16_TOL
    assert ((ours - ref).abs().max() / (1 + ref.abs().max())).item() < tol


@pytest.mark.parametrize("tokens", [1, 8, 256])
def test_cuda_graph_replays_new_routing_like_eager(tokens):
    x, w13, w2, weights, ids = random_moe(tokens, 128, 8, *QWEN3_30B, torch.bfloat16, "cuda")
    fused_moe_triton(x, w13, w2, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_moe_triton(x, w13, w2, weights, ids)
    for seed in (1, 2):  # new inputs and routing, written into the captured buffers
        new_x, _, _, new_weights, new_ids = random_moe(tokens, 128, 8, *QWEN3_30B,
                                                       torch.bfloat16, "cuda", seed=seed)
        x.copy_(new_x)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        eager = fused_moe_triton(x, w13, w2, weights, ids)
        torch.testing.assert_close(captured, eager, rtol=0, atol=0)
        ref = fused_moe_native(x.float(), w13.float(), w2.float(), weights, ids)
        assert ((captured.float() - ref).abs().max() / (1 + ref.abs().max())).item() < BF16_TOL
