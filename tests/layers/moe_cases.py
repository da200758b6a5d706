"""Shared by the CPU (interpreted Triton) and GPU tests of the fused MoE kernel: random
experts and routing, and the kernel's error against the torch reference."""

from __future__ import annotations

from functools import partial

import torch

from pagoda.layers.moe.native import fused_moe_native, moe_by_expert
from pagoda.layers.moe.router import select_experts


def random_moe(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
               dtype: torch.dtype, device: str, seed: int = 0):
    """(x, w13, w2, weights, ids): weights scaled so activations stay near unit size."""
    # drawn on the device: the CPU's generator takes seconds at Mixtral's width
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    x = randn(tokens, hidden)
    w13 = randn(experts, 2 * inter, hidden, scale=hidden ** -0.5)
    w2 = randn(experts, hidden, inter, scale=inter ** -0.5)
    logits = randn(tokens, experts).float()
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


def kernel_error(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
                 dtype: torch.dtype, device: str, drop_experts: bool = False) -> float:
    """Max |triton - reference| / (1 + max |reference|). The reference runs in float32 on
    the same (rounded) inputs. `drop_experts`: the upper half of the experts live on another
    rank (ids -1)."""
    from pagoda.layers.moe.triton_moe import fused_moe_triton
    x, w13, w2, weights, ids = random_moe(tokens, experts, top_k, hidden, inter, dtype, device)
    if drop_experts:
        ids = torch.where(ids < experts // 2, ids, torch.full_like(ids, -1))
    ours = fused_moe_triton(x, w13, w2, weights, ids, partial=drop_experts).float()
    ref = fused_moe_native(x.float(), w13.float(), w2.float(), weights, ids)
    return ((ours - ref).abs().max() / (1 + ref.abs().max())).item()


def distinct_logits(tokens: int, experts: int, dtype: torch.dtype, device: str,
                    seed: int = 0) -> torch.Tensor:
    """Router logits with no two equal in a row, even in bf16 (small integers / 8): which
    of two tied experts a top-k picks is unspecified."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(experts, generator=gen) for _ in range(tokens)]
    return (torch.stack(rows).float() / 8).to(device=device, dtype=dtype)


def routed_error(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
                 renormalize: bool, dtype: torch.dtype, device: str,
                 expert_start: int = 0, local_experts: int | None = None) -> float:
    """The layer from router logits (routing, grouping and experts in Triton) against the
    torch path, experts [expert_start, expert_start + local_experts) on this rank."""
    from pagoda.layers.moe.layer import ExpertRange, FusedMoE
    from pagoda.layers.moe.triton_moe import fused_moe_routed
    x, w13, w2, _, _ = random_moe(tokens, experts, top_k, hidden, inter, dtype, device)
    placement = ExpertRange(experts, expert_start, local_experts)
    layer = FusedMoE(experts, top_k, hidden, inter, renormalize, experts=placement)
    layer = layer.to(device=device, dtype=dtype)
    local = slice(expert_start, expert_start + placement.local)
    layer.gate_up_proj.data.copy_(w13[local])
    layer.down_proj.data.copy_(w2[local])
    logits = distinct_logits(tokens, experts, dtype, device)
    ours = fused_moe_routed(x, logits, layer.gate_up_proj, layer.down_proj, top_k, renormalize,
                            expert_start, partial=not placement.whole).float()
    ref = layer.forward_native(x.float(), logits.float()) if dtype == torch.float32 else \
        layer.float().forward_native(x.float(), logits.float())
    return ((ours - ref).abs().max() / (1 + ref.abs().max())).item()


def router_for(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x with its first `tokens` inputs made one-hot, and router weights [experts, hidden]
    whose product with it is exactly `logits` (every other input meets a zero weight)."""
    tokens, experts = logits.shape
    x[:, :tokens] = torch.eye(tokens, dtype=x.dtype, device=x.device)
    router = torch.zeros(experts, x.shape[1], dtype=x.dtype, device=x.device)
    router[:, :tokens] = logits.t()
    return router


def router_error(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
                 renormalize: bool, dtype: torch.dtype, device: str,
                 expert_start: int = 0, local_experts: int | None = None) -> float:
    """The layer from the hidden states and the router's weights (the router's product,
    routing and grouping in one launch, then the experts) against the torch path on the
    logits that product gives exactly."""
    from pagoda.layers.moe.layer import ExpertRange, FusedMoE
    from pagoda.layers.moe.triton_moe import fused_moe_from_router
    x, w13, w2, _, _ = random_moe(tokens, experts, top_k, hidden, inter, dtype, device)
    logits = distinct_logits(tokens, experts, dtype, device)
    router = router_for(logits, x)
    placement = ExpertRange(experts, expert_start, local_experts)
    local = slice(expert_start, expert_start + placement.local)
    ours = fused_moe_from_router(x, router, w13[local].contiguous(), w2[local].contiguous(),
                                 top_k, renormalize, expert_start,
                                 partial=not placement.whole).float()
    layer = FusedMoE(experts, top_k, hidden, inter, renormalize, experts=placement)
    layer = layer.to(device=device, dtype=torch.float32)
    layer.gate_up_proj.data.copy_(w13[local])
    layer.down_proj.data.copy_(w2[local])
    ref = layer.forward_native(x.float(), logits.float())
    return ((ours - ref).abs().max() / (1 + ref.abs().max())).item()


def float8_experts(w: torch.Tensor, columns: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked experts [experts, rows, inputs] as float8 values and float32 scales
    [experts, rows, groups]: one a row, or one a row and `columns` inputs."""
    experts, rows, inputs = w.shape
    groups = inputs // columns if columns else 1
    grouped = w.float().view(experts, rows, groups, inputs // groups)
    scale = (grouped.abs().amax(dim=-1) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    values = (grouped / scale[..., None]).to(torch.float8_e4m3fn).view(experts, rows, inputs)
    return values, scale


def integer_experts(w: torch.Tensor, bits: int, group: int):
    """Stacked experts [experts, rows, inputs] as GroupCodes pieces, one an expert: codes of
    `bits` bits with a scale and low (float16 values) a row and `group` inputs."""
    from pagoda.layers.quantization.cpu_block_dot import GroupCodes
    experts, rows, inputs = w.shape
    grouped = w.float().view(experts, rows, inputs // group, group)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale = ((high - low) / (2 ** bits - 1)).clamp(min=1e-6).half().float()
    low = low.half().float()
    codes = ((grouped - low[..., None]) / scale[..., None]).round().clamp(0, 2 ** bits - 1)
    codes = codes.to(torch.uint8).view(experts, rows, inputs)
    return [GroupCodes(codes[e], scale[e], low[e], group, bits) for e in range(experts)]


def stacked_codes(w: torch.Tensor, layout: tuple):
    """w's experts as one ExpertCodes stack in `layout`: ("float8", inputs a scale or None)
    or ("int", bits, group)."""
    from pagoda.layers.moe import expert_codes
    experts, rows, inputs = w.shape
    if layout[0] == "float8":
        return expert_codes.ExpertCodes(*float8_experts(w, layout[1]))
    pieces = integer_experts(w, *layout[1:])
    stack = expert_codes.empty_stack(pieces[0], experts, rows, inputs, w.device)
    for expert, piece in enumerate(pieces):
        expert_codes.put(stack, expert, 0, piece)
    return stack


def float8_rows(rows: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Activations as the FP8 tensor-core path takes them: rounded to float8 with a scale a
    row (or a row and `group` inputs: block-scaled weights') by its own quantizer (fp8_rows:
    bit for bit torch's on a GPU; under the interpreter its float8 rounding differs from
    torch's, so the reference takes the kernel's), in float32."""
    from pagoda.layers.moe.triton_moe import FP8_MAX
    from pagoda.layers.quantization.triton_group_gemm import fp8_rows
    tokens, inputs = rows.shape
    values, scale = fp8_rows(rows.contiguous().view(-1, group or inputs), FP8_MAX)
    return (values.float() * scale).view(tokens, inputs)


def unrounded(rows: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Activations as a path that keeps them in 16 bits takes them."""
    return rows


# layout -> (the stacks' layout it runs, the triton_moe settings it runs under, the
# activations as the kernel then rounds them given the layout's group): float8 weight-only
# (the activations in 16 bits), on FP8 tensor cores, integer codes decoded to weights before
# each product, integer codes in tiles of few rows with their inputs not split (the
# interpreter's 132 multiprocessors split every small call's), and float8 experts with
# their inputs split in two (PAGODA_MOE_SPLIT_K's way: by default only integer codes split)
KERNEL_SETTINGS = {
    "float8": ("float8", {"FP8_TENSOR_CORES_FROM": None}, unrounded),
    "float8-tc": ("float8", {"FP8_TENSOR_CORES_FROM": 1}, float8_rows),
    "int-decoded": ("int", {"DECODED_FROM_ROWS": 1}, unrounded),
    "int-unsplit": ("int", {"SPLIT_K": 1}, unrounded),
    "float8-split": ("float8", {"FP8_TENSOR_CORES_FROM": None, "SPLIT_K": 2}, unrounded),
    "float8-tc-split": ("float8", {"FP8_TENSOR_CORES_FROM": 1, "SPLIT_K": 2}, float8_rows),
}


def codes_kernel_error(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
                       layout: tuple, dtype: torch.dtype, device: str,
                       drop_experts: bool = False) -> float:
    """kernel_error for experts held as codes (stacked_codes' layouts): the kernel against
    the torch path on the weights they decode to. Layouts of KERNEL_SETTINGS run with
    settings of the kernel: ("float8", inputs a scale or None), float8 experts weight-only;
    ("float8-tc", ...) on FP8 tensor cores with the activations quantized too; ("int-decoded",
    bits, group), integer codes decoded to weights before each product in blocks of any size;
    ("int-unsplit", bits, group), integer codes with no split of the inputs; ("float8-split",
    ...) and ("float8-tc-split", ...), float8 experts with their inputs split in two (under
    the interpreter, which reads the settings at each call)."""
    if layout[0] not in KERNEL_SETTINGS:
        return _codes_error(tokens, experts, top_k, hidden, inter, layout, dtype, device,
                            drop_experts, unrounded)
    from pagoda.layers.moe import triton_moe
    base, settings, rounding = KERNEL_SETTINGS[layout[0]]
    saved = {name: getattr(triton_moe, name) for name in settings}
    for name, value in settings.items():
        setattr(triton_moe, name, value)
    try:
        return _codes_error(tokens, experts, top_k, hidden, inter, (base, *layout[1:]), dtype,
                            device, drop_experts, partial(rounding, group=layout[1]))
    finally:
        for name, value in saved.items():
            setattr(triton_moe, name, value)


def _codes_error(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
                 layout: tuple, dtype: torch.dtype, device: str, drop_experts: bool,
                 rounded) -> float:
    from pagoda.layers.moe.triton_moe import fused_moe_triton
    x, w13, w2, weights, ids = random_moe(tokens, experts, top_k, hidden, inter,
                                          torch.float32, device)
    x = x.to(dtype)
    if drop_experts:
        ids = torch.where(ids < experts // 2, ids, torch.full_like(ids, -1))
    codes = stacked_codes(w13, layout), stacked_codes(w2, layout)
    ours = fused_moe_triton(x, *codes, weights, ids, partial=drop_experts).float()
    gate_up, down = [torch.stack([c.decoded(e, torch.float32) for e in range(experts)])
                     for c in codes]
    # each product's input rows `rounded` as the kernel takes them, the gated activation
    # rounded to x's dtype between the products as the kernel stores it
    ref = moe_by_expert(x.float(), lambda e, rows: rounded(rows) @ gate_up[e].t(),
                        lambda e, rows: rounded(rows.to(dtype).float()) @ down[e].t(),
                        weights, ids, experts)
    return ((ours - ref).abs().max() / (1 + ref.abs().max())).item()
