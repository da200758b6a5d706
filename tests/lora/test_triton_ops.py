"""The Triton shrink/expand kernels equal the torch LoRA path on mixed batches (adapters of
several ranks in several slots, base-model tokens between them, fused layers of 1-3 pieces).

They run here under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is
imported, hence a subprocess) and are compiled for sm_90 with no GPU; they run at real sizes
on the GPU in tests/gpu/test_lora_gpu.py."""

from __future__ import annotations

import json

import pytest
import torch

from pagoda.lora.layers import LoRAStepState, LoRAWeights, ModuleShard, lora_torch
from tests.lora.test_layers import random_adapter
from tests.utils import compile_for_cuda, interpreter_report

MARKER = "LORA-KERNEL-ERRORS "
LAYOUTS = {"qkv": [48, 16, 16], "gate_up": [40, 40], "o": [24]}


def random_weights(sizes: list[int], in_features: int, max_loras: int, max_rank: int,
                   dtype: torch.dtype, device: str) -> LoRAWeights:
    modules = [f"m{i}" for i in range(len(sizes))]
    weights = LoRAWeights(modules, [ModuleShard.whole(in_features, n) for n in sizes],
                          max_loras, max_rank, dtype, torch.device(device))
    for slot in range(max_loras):
        rank = max(1, max_rank >> slot)  # 16, 8, 4 ...: padded ranks too
        targets = modules[slot % len(modules):] or modules
        sized = [sizes[modules.index(m)] for m in targets]
        weights.load(slot, random_adapter(slot + 1, targets, sized, rank, in_features,
                                          seed=slot))
    return weights


# (tokens, input features) -> tolerance: a few tokens; then more than one tile per adapter and
# an input wide enough that shrink splits it (pagoda.lora.triton_ops.split_k). float32 sums of
# a thousand products differ by their order: on the wide shape the torch path itself is 4e-5
# (relative) from a float64 evaluation.
TOLERANCE = {(7, 40): 1e-5, (40, 1024): 1e-4}


def shape_name(tokens: int, width: int) -> str:
    return f"{tokens}x{width}"


def compare_all(device: str, dtype: torch.dtype, tokens: int = 7, in_features: int = 40,
                max_loras: int = 3, max_rank: int = 16) -> dict[str, float]:
    """Max |triton - torch| / (1 + |torch|) per layout, on one mixed batch (the step's
    buffer sized for more tokens than the batch has, as the runner's is)."""
    from pagoda.lora.triton_ops import lora_triton
    gen = torch.Generator().manual_seed(0)
    slots = torch.randint(-1, max_loras, (tokens,), generator=gen, dtype=torch.int32)
    slots[0] = -1
    state = LoRAStepState(2 * tokens, max_loras, torch.device(device))
    state.set(slots.numpy())
    errors = {}
    for name, sizes in LAYOUTS.items():
        weights = random_weights(sizes, in_features, max_loras, max_rank, dtype, device)
        x = torch.randn(tokens, in_features, generator=gen).to(device, dtype)
        base = torch.randn(tokens, sum(sizes), generator=gen).to(device, dtype)
        expected, got = base.clone(), base.clone()
        lora_torch(weights, x, expected, slots.to(device))
        lora_triton(weights, x, got, state)
        errors[name] = ((got.float() - expected.float()).abs()
                        / (1 + expected.float().abs())).max().item()
        errors[f"{name}_base_rows_untouched"] = float(not torch.equal(got[0], base[0]))
    return errors


def test_kernels_match_torch_under_the_interpreter():
    errors = interpreter_report("tests.lora.test_triton_ops", MARKER)
    tolerance = {shape_name(*shape): value for shape, value in TOLERANCE.items()}
    assert set(errors) == set(tolerance)
    for shape, by_layout in errors.items():
        assert set(by_layout) >= set(LAYOUTS)
        for name, error in by_layout.items():
            assert error < tolerance[shape], (shape, name, error)


@pytest.mark.parametrize(("dtype", "precision"), [("bf16", "tf32"), ("fp16", "tf32"),
                                                  ("fp32", "ieee")])
def test_kernels_compile_for_cuda(dtype, precision):
    from pagoda.lora.triton_ops import _expand_kernel, _shrink_kernel
    ints = dict.fromkeys(["num_tokens", "rank"], "i32")
    compile_for_cuda(_shrink_kernel, {
        "x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "u_ptr": "*fp32", "sorted_ptr": "*i32",
        "tiles_ptr": "*i32", **ints, "stride_x": "i32", "stride_as": "i32", "stride_ap": "i32",
        "stride_ar": "i32"}, {"K": 4096, "K_SPLIT": 512, "NUM_PIECES": 3, "BLOCK_M": 16,
                              "BLOCK_R": 16, "BLOCK_K": 128, "DOT_PRECISION": precision})
    compile_for_cuda(_expand_kernel, {
        "u_ptr": "*fp32", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "sorted_ptr": "*i32",
        "tiles_ptr": "*i32", "num_tokens": "i32", "N": "i32", "rank": "i32", "stride_y": "i32",
        "stride_bs": "i32", "stride_br": "i32", "OFF1": "i32", "OFF2": "i32"},
        {"NUM_PIECES": 3, "SPLIT_K": 8, "BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_N": 128,
         "DOT_PRECISION": precision})


if __name__ == "__main__":
    print(MARKER + json.dumps({shape_name(tokens, width): compare_all("cpu", torch.float32,
                                                                     tokens, width)
                               for tokens, width in TOLERANCE}))
