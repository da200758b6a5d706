"""The Triton MoE kernel against the torch reference at real widths, bf16: token counts
1...8192, expert counts 8...128, top-k 1...8; an expert range (expert parallelism); the
whole layer (router + kernel), from the router's logits and, for decode batches, from the
router's weights (its product in the routing launch); the kernel captured in a CUDA graph
against eager (device only); experts held as codes (float8 with row or block scales, 4-bit
and 6-bit integers in groups) against the weights they decode to."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.linear import ReplicatedLinear
from pagoda.layers.moe import triton_moe
from pagoda.layers.moe.layer import FusedMoE
from pagoda.layers.moe.native import fused_moe_native
from pagoda.layers.moe.triton_moe import (
    fused_moe_from_router,
    fused_moe_routed,
    fused_moe_triton,
)
from tests.layers.moe_cases import (
    codes_kernel_error,
    distinct_logits,
    kernel_error,
    random_moe,
    routed_error,
    router_error,
    router_for,
)
from tests.layers.test_expert_codes import loaded_layer

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


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("splits", [2, 4])
def test_kernel_with_split_inputs_matches_torch_bf16(tokens, splits, monkeypatch, gpu_report):
    """bf16 experts at decode with their inputs split (PAGODA_MOE_SPLIT_K: by default only
    integer codes split)."""
    monkeypatch.setattr(triton_moe, "SPLIT_K", splits)
    error = kernel_error(tokens, 128, 8, *QWEN3_30B, torch.bfloat16, "cuda")
    gpu_report(tokens=tokens, experts=128, top_k=8, shape=f"{splits} splits", error=error)
    assert error < BF16_TOL


@pytest.mark.parametrize("tokens", [1, 300])
def test_kernel_with_experts_on_another_rank(tokens, gpu_report):
    error = kernel_error(tokens, 64, 8, *QWEN3_30B, torch.bfloat16, "cuda", drop_experts=True)
    gpu_report(tokens=tokens, experts=64, top_k=8, shape="half the experts", error=error)
    assert error < BF16_TOL


ROUTED = [(1, 128, 8, True, 0, None), (64, 128, 8, False, 0, None), (4096, 128, 8, True, 0, None),
          (300, 8, 2, True, 0, None), (100, 128, 8, True, 32, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "experts", "top_k", "renormalize", "start", "local"), ROUTED)
def test_layer_from_router_logits_matches_the_torch_path(dtype, tokens, experts, top_k,
                                                          renormalize, start, local,
                                                          gpu_report):
    """The fused routing kernel (softmax, top-k, renormalise, local ids, counts) and the
    experts against select_experts and the torch experts."""
    error = routed_error(tokens, experts, top_k, *QWEN3_30B, renormalize, dtype, "cuda",
                         start, local)
    gpu_report(tokens=tokens, experts=experts, top_k=top_k, shape="routed layer",
               dtype=str(dtype).removeprefix("torch."), error=error)
    assert error < (1e-4 if dtype == torch.float32 else BF16_TOL)


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


def assert_replays_like_eager(run, refill) -> None:
    """Capture run() in a CUDA graph; after each refill(seed) of its inputs in place, a
    replay equals an eager call bit for bit."""
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for seed in (1, 2):
        refill(seed)
        graph.replay()
        torch.testing.assert_close(captured, run(), rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, 32])
def test_cuda_graph_of_the_routed_layer_replays_like_eager(tokens):
    x, w13, w2, _, _ = random_moe(tokens, 128, 8, *QWEN3_30B, torch.bfloat16, "cuda")
    logits = distinct_logits(tokens, 128, torch.bfloat16, "cuda")

    def refill(seed: int) -> None:
        logits.copy_(distinct_logits(tokens, 128, torch.bfloat16, "cuda", seed=seed))
        x.copy_(random_moe(tokens, 128, 8, *QWEN3_30B, torch.bfloat16, "cuda", seed=seed)[0])
    assert_replays_like_eager(lambda: fused_moe_routed(x, logits, w13, w2, 8, True), refill)


ROUTER = [(1, 128, 8, True, 0, None), (7, 128, 8, True, 0, None), (16, 128, 8, True, 32, 32),
          (16, 8, 2, False, 0, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "experts", "top_k", "renormalize", "start", "local"), ROUTER)
def test_layer_from_the_router_weights_matches_the_torch_path(dtype, tokens, experts, top_k,
                                                              renormalize, start, local,
                                                              gpu_report):
    """The router's product, routing and grouping in one launch, then the experts, against
    the torch path on the logits the product gives."""
    error = router_error(tokens, experts, top_k, *QWEN3_30B, renormalize, dtype, "cuda",
                         start, local)
    gpu_report(tokens=tokens, experts=experts, top_k=top_k, shape="router weights",
               dtype=str(dtype).removeprefix("torch."), error=error)
    assert error < (1e-4 if dtype == torch.float32 else BF16_TOL)


def test_the_layer_takes_the_router_launch_for_decode_batches_only(monkeypatch):
    """FusedMoE.forward_with_router: up to ONE_PROGRAM_TOKENS tokens through the one
    launch, more through the router layer's logits; both equal the layer on those logits."""
    hidden, inter = QWEN3_30B
    layer = FusedMoE(128, 8, hidden, inter, True).to(device="cuda", dtype=torch.bfloat16)
    router = ReplicatedLinear(hidden, 128).to(device="cuda", dtype=torch.bfloat16)
    _, w13, w2, _, _ = random_moe(1, 128, 8, hidden, inter, torch.bfloat16, "cuda")
    layer.gate_up_proj.data.copy_(w13)
    layer.down_proj.data.copy_(w2)
    launches = []
    real = triton_moe.route_from_router
    monkeypatch.setattr(triton_moe, "route_from_router",
                        lambda *a: launches.append(a[0].shape[0]) or real(*a))
    for tokens in (1, 16, 17):
        x = random_moe(tokens, 128, 8, hidden, inter, torch.bfloat16, "cuda", seed=tokens)[0]
        logits = distinct_logits(tokens, 128, torch.bfloat16, "cuda", seed=tokens)
        router.weight.data.copy_(router_for(logits, x))
        torch.testing.assert_close(layer.forward_with_router(x, router), layer(x, logits),
                                   rtol=0, atol=0)
    assert launches == [1, 16]


@pytest.mark.parametrize("tokens", [1, 16])
def test_cuda_graph_of_the_router_launch_replays_like_eager(tokens):
    x, w13, w2, _, _ = random_moe(tokens, 128, 8, *QWEN3_30B, torch.bfloat16, "cuda")
    router = router_for(distinct_logits(tokens, 128, torch.bfloat16, "cuda"), x)

    def refill(seed: int) -> None:
        x.copy_(random_moe(tokens, 128, 8, *QWEN3_30B, torch.bfloat16, "cuda", seed=seed)[0])
        router.copy_(router_for(distinct_logits(tokens, 128, torch.bfloat16, "cuda",
                                                seed=seed), x))
    assert_replays_like_eager(lambda: fused_moe_from_router(x, router, w13, w2, 8, True),
                              refill)


CODES_TOKENS = [1, 7, 64, 2048]
# Qwen3-30B-A3B-FP8's block scales and per-row ones; AWQ/GPTQ's 4-bit groups of 128; GGUF
# Q4_K's 4-bit groups of 32 and Q6_K's 6-bit groups of 16; float8 on FP8 tensor cores;
# integer codes at decode with their inputs not split (the default splits them), float8
# ones on tensor cores split in two (PAGODA_MOE_SPLIT_K=2)
CODES_LAYOUTS = [("float8", None), ("float8", 128), ("int", 4, 128), ("int", 4, 32),
                 ("int", 6, 16), ("float8-tc", None), ("float8-tc", 128),
                 ("int-unsplit", 4, 128), ("float8-tc-split", 128)]


@pytest.mark.parametrize("tokens", CODES_TOKENS)
@pytest.mark.parametrize("layout", CODES_LAYOUTS, ids=str)
def test_expert_codes_match_their_decoded_weights(tokens, layout, gpu_report):
    """Qwen3-30B-A3B's experts (128, top 8) held as codes, bf16 activations, against the
    torch path on the weights they decode to."""
    error = codes_kernel_error(tokens, 128, 8, *QWEN3_30B, layout, torch.bfloat16, "cuda")
    gpu_report(tokens=tokens, experts=128, top_k=8, shape=str(layout), error=error)
    assert error < BF16_TOL


@pytest.mark.parametrize("tokens", [1, 16, 300])
@pytest.mark.parametrize("layout", [("float8", 128), ("int", 4, 32)], ids=str)
def test_a_layer_of_codes_from_its_router_matches_its_torch_path(tokens, layout, monkeypatch):
    """FusedMoE holding stacked codes: forward_with_router (the router's launch up to 16
    tokens, the router's logits past them) and the routed layer against the torch path
    decoding them, and a CUDA graph of the router launch replaying like eager (float8
    weight-only: the tensor-core path's rounded activations are
    test_expert_codes_match_their_decoded_weights' float8-tc)."""
    from pagoda.layers.moe import triton_moe
    monkeypatch.setattr(triton_moe, "FP8_TENSOR_CORES_FROM", None)
    hidden, inter = QWEN3_30B
    _, w13, w2, _, _ = random_moe(1, 128, 8, hidden, inter, torch.float32, "cuda")
    with torch.device("cuda"):
        layer = loaded_layer(w13, w2, layout)
        router = ReplicatedLinear(hidden, 128).to(dtype=torch.bfloat16)
    x = random_moe(tokens, 128, 8, hidden, inter, torch.bfloat16, "cuda", seed=tokens)[0]
    logits = distinct_logits(tokens, 128, torch.bfloat16, "cuda", seed=tokens)
    router.weight.data.copy_(router_for(logits, x))
    reference = layer.forward_native(x, logits).float()
    for ours in (layer.forward_with_router(x, router), layer(x, logits)):
        error = ((ours.float() - reference).abs().max() / (1 + reference.abs().max())).item()
        assert error < BF16_TOL
    if tokens <= 16:
        def refill(seed: int) -> None:
            x.copy_(random_moe(tokens, 128, 8, hidden, inter, torch.bfloat16, "cuda",
                               seed=seed)[0])
        assert_replays_like_eager(lambda: layer.forward_with_router(x, router), refill)
