"""The fused MoE layer: the router's selection, the torch path against a per-token loop,
the weight loaders (per-expert, packed, an expert range), and the Triton kernel (grouping
and both grouped GEMMs) under Triton's CPU interpreter on small shapes. TRITON_INTERPRET=1
must be set before triton is imported, hence a subprocess; tests/gpu/test_fused_moe.py runs
it at real sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from pagoda.layers.moe.layer import ExpertRange, FusedMoE
from pagoda.layers.moe.native import fused_moe_native
from pagoda.layers.moe.router import select_experts
from pagoda.layers.parallel import SINGLE, ParallelGroup
from tests.layers.moe_cases import random_moe

MARKER = "MOE-RESULTS "
# (tokens, experts, top_k, hidden, inter, drop_experts): decode and prefill-like blocks,
# an intermediate size that is not a power of two, an expert range; up to MAX_SUMMED_TOKENS
# (8) tokens the down GEMM adds each token's rows itself, past it a torch reduction does
INTERPRETED_CASES = [(1, 8, 2, 32, 48, False), (7, 4, 4, 64, 16, False),
                     (40, 8, 2, 32, 32, False), (9, 8, 3, 32, 16, True), (5, 8, 1, 32, 16, False),
                     (3, 8, 3, 32, 16, True), (8, 8, 2, 96, 16, False)]
# float experts with their inputs split in two (PAGODA_MOE_SPLIT_K=2: by default only integer
# codes split): the gate-up product, and the down one adding the top-k rows
SPLIT_CASES = [(3, 8, 2, 256, 64, False), (1, 4, 2, 256, 256, True)]
# the layer from router logits: (tokens, experts, top_k, hidden, inter, renormalize,
# first local expert, local experts)
ROUTED_CASES = [(1, 8, 2, 32, 48, True, 0, None), (20, 6, 3, 32, 16, False, 0, None),
                (9, 8, 3, 32, 16, True, 4, 4), (9, 8, 8, 32, 16, True, 2, 3)]
# the layer from the hidden states and the router's weights (the same columns; the hidden
# size a multiple of the router launch's 128-input split, two splits here)
ROUTER_CASES = [(1, 8, 2, 256, 48, True, 0, None), (16, 6, 3, 256, 16, False, 0, None),
                (9, 8, 3, 128, 16, True, 4, 4)]


def per_token_loop(x, w13, w2, weights, ids):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            gate, up = F.linear(x[t], w13[ids[t, j]]).chunk(2)
            out[t] += weights[t, j] * F.linear(F.silu(gate) * up, w2[ids[t, j]])
    return out


def test_qwen_router_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    raw, ids = select_experts(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 1]] and ids.dtype == torch.int32
    assert torch.allclose(raw, torch.softmax(logits, -1)[:, :2])
    normed, _ = select_experts(logits, 2, renormalize=True)
    assert torch.allclose(normed, torch.softmax(logits[:, :2], -1))  # Mixtral's rule


def test_torch_path_is_the_per_token_sum():
    x, w13, w2, weights, ids = random_moe(6, 8, 3, 16, 12, torch.float32, "cpu")
    torch.testing.assert_close(fused_moe_native(x, w13, w2, weights, ids),
                               per_token_loop(x, w13, w2, weights, ids))


def layer_with(w13: torch.Tensor, w2: torch.Tensor, experts: ExpertRange | None = None,
               packed: bool = False, group: ParallelGroup = SINGLE) -> FusedMoE:
    layer = FusedMoE(w13.shape[0], 2, w13.shape[2], w2.shape[2], True, group, experts=experts)
    if packed:
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, w13, None)
        layer.down_proj.weight_loader(layer.down_proj, w2, None)
        return layer
    inter = w2.shape[2]
    for e in range(w13.shape[0]):
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, w13[e, :inter], 2 * e)
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, w13[e, inter:], 2 * e + 1)
        layer.down_proj.weight_loader(layer.down_proj, w2[e], e)
    return layer


@pytest.mark.parametrize("packed", [False, True])
def test_loaders_fill_the_stacked_weights_from_either_form(packed):
    _, w13, w2, _, _ = random_moe(1, 6, 2, 16, 8, torch.float32, "cpu")
    layer = layer_with(w13, w2, packed=packed)
    assert torch.equal(layer.gate_up_proj, w13) and torch.equal(layer.down_proj, w2)
    part = layer_with(w13, w2, ExpertRange(6, start=2, count=3), packed=packed)
    assert torch.equal(part.gate_up_proj, w13[2:5]) and torch.equal(part.down_proj, w2[2:5])


def test_expert_ranges_sum_to_the_whole_layer():
    x, w13, w2, _, _ = random_moe(5, 6, 2, 16, 8, torch.float32, "cpu")
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    whole = layer_with(w13, w2)(x, logits)
    halves = [layer_with(w13, w2, ExpertRange(6, start, 3))(x, logits) for start in (0, 3)]
    torch.testing.assert_close(halves[0] + halves[1], whole)


@pytest.mark.parametrize("packed", [False, True])
def test_an_expert_parallel_group_gives_each_rank_whole_experts(packed):
    x, w13, w2, _, _ = random_moe(5, 6, 2, 16, 8, torch.float32, "cpu")
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    parts = []
    for rank in (0, 1):
        layer = layer_with(w13, w2, packed=packed,
                           group=ParallelGroup(rank, 2, expert_parallel=True))
        assert (layer.placement.start, layer.placement.local) == (3 * rank, 3)
        assert torch.equal(layer.gate_up_proj, w13[3 * rank:3 * rank + 3])  # full width
        assert torch.equal(layer.down_proj, w2[3 * rank:3 * rank + 3])
        weights, ids = layer.route(logits)  # the group's all-reduce is the sum below
        parts.append(fused_moe_native(x, layer.gate_up_proj, layer.down_proj, weights, ids))
    torch.testing.assert_close(parts[0] + parts[1], layer_with(w13, w2)(x, logits))


def test_a_packed_tensor_of_the_wrong_expert_count_is_refused():
    w13 = random_moe(1, 4, 2, 16, 8, torch.float32, "cpu")[1]
    layer = FusedMoE(6, 2, 16, 8, True)
    with pytest.raises(ValueError, match="6 experts"):
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, w13, None)


def test_triton_kernels_match_torch_under_the_interpreter():
    """float32 only: the interpreter's bf16 dot is wrong (triton 3.6 with numpy 2); the GPU
    tests cover bf16."""
    code = (
        "import json, torch\n"
        "from tests.layers.moe_cases import kernel_error\n"
        f"cases = {INTERPRETED_CASES!r}\n"
        "errors = [kernel_error(t, e, k, h, i, torch.float32, 'cpu', drop) "
        "for t, e, k, h, i, drop in cases]\n"
        "from tests.layers.moe_cases import routed_error, router_error\n"
        f"errors += [routed_error(*c[:6], torch.float32, 'cpu', *c[6:]) "
        f"for c in {ROUTED_CASES!r}]\n"
        f"errors += [router_error(*c[:6], torch.float32, 'cpu', *c[6:]) "
        f"for c in {ROUTER_CASES!r}]\n"
        "from pagoda.layers.moe import triton_moe\n"
        "triton_moe.SPLIT_K = 2\n"
        "errors += [kernel_error(t, e, k, h, i, torch.float32, 'cpu', drop) "
        f"for t, e, k, h, i, drop in {SPLIT_CASES!r}]\n"
        "triton_moe.SPLIT_K = None\n"
        "from pagoda.layers.moe.triton_moe import align_to_experts\n"
        "ids = torch.tensor([[3, 1], [1, 0], [3, 1]], dtype=torch.int32)\n"
        "b = align_to_experts(ids, 4, 4)\n"
        # the top-k sum: inside the down GEMM up to 8 tokens, one torch reduction past them
        "from tests.layers.moe_cases import random_moe\n"
        "from pagoda.layers.moe.triton_moe import fused_moe_triton\n"
        "few, many = random_moe(3, 8, 3, 32, 16, torch.float32, 'cpu'), "
        "random_moe(9, 8, 3, 32, 16, torch.float32, 'cpu')\n"
        "real_sum, torch_sums = torch.Tensor.sum, []\n"
        "torch.Tensor.sum = lambda self, *a, **k: torch_sums.append(1) or real_sum(self, *a, **k)\n"
        "fused_moe_triton(*few)\n"
        "sums_few = len(torch_sums)\n"
        "fused_moe_triton(*many)\n"
        "torch.Tensor.sum = real_sum\n"
        "sums = [sums_few, len(torch_sums) - sums_few]\n"
        "from pagoda.layers.tile_counters import nonzero_counters\n"
        f"print({MARKER!r} + json.dumps({{'errors': errors, "
        "'sorted': b.sorted_ids.tolist(), 'experts': b.expert_ids.tolist(), "
        "'padded': b.num_padded.item(), 'counters': nonzero_counters(), "
        "'torch_sums': sums}))\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(li for li in run.stdout.splitlines() if li.startswith(MARKER))
    result = json.loads(line[len(MARKER):])
    assert len(result["errors"]) == \
        len(INTERPRETED_CASES) + len(ROUTED_CASES) + len(ROUTER_CASES) + len(SPLIT_CASES)
    assert max(result["errors"]) < 1e-5, result["errors"]
    assert result["counters"] == 0  # every summing launch reset its tiles' counters
    assert result["torch_sums"] == [0, 1]  # 3 tokens: summed in the kernel; 9: by torch
    # assignments t * 2 + j: expert 0 has 3; expert 1 has 1, 2, 5; expert 3 has 0, 4
    assert result["padded"] == 12
    assert result["experts"][:3] == [0, 1, 3] and set(result["experts"][3:]) <= {-1}
    rows = result["sorted"]
    assert rows[0:4] == [3, 6, 6, 6]
    assert sorted(rows[4:7]) == [1, 2, 5] and rows[7] == 6
    assert sorted(rows[8:10]) == [0, 4] and rows[10:12] == [6, 6]
