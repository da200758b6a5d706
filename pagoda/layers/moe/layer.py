"""The fused expert layer: every expert's SwiGLU MLP stacked into two parameters,
`gate_up_proj` [experts, 2 * inter, hidden] (each expert's gate rows, then its up rows) and
`down_proj` [experts, hidden, inter], named as transformers 5 names its packed experts.

Checkpoints hold experts either one tensor each (`experts.{i}.gate_proj` / `up_proj` /
`down_proj`, Mixtral's `w1` / `w3` / `w2`), or packed (`experts.gate_up_proj`,
`experts.down_proj`): the weight loaders take both. A per-expert piece is numbered by its
global expert (gate_up: 2 * expert + 0 for gate, + 1 for up; down: expert), so that a complete
load is checked piece by piece.

Splitting: a tensor-parallel group splits every expert's intermediate size (outputs summed
over the group); an `ExpertRange` keeps only a contiguous range of the experts on this rank
(expert parallelism: a group with `expert_parallel` gives each rank an equal range of whole
experts): routing stays global, assignments to other ranks' experts add nothing here, and the
ranks' partial outputs are summed over the group."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from pagoda.layers.custom_op import DeviceDispatch
from pagoda.layers.linear import (
    LinearBase,
    UnquantizedLinearMethod,
    copy_checked,
    linear_methods_deferred,
    new_parameter,
)
from pagoda.layers.moe.native import fused_moe_native, moe_by_expert
from pagoda.layers.moe.router import select_experts
from pagoda.layers.parallel import SINGLE, ParallelGroup


@dataclass(frozen=True, slots=True)
class ExpertRange:
    """Experts [start, start + count) of `total` live on this rank."""

    total: int
    start: int = 0
    count: int | None = None

    @property
    def local(self) -> int:
        return self.total - self.start if self.count is None else self.count

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.local == self.total

    def __post_init__(self) -> None:
        if not (0 <= self.start and self.local > 0 and self.start + self.local <= self.total):
            raise ValueError(f"experts [{self.start}, {self.start}+{self.count}) are not a "
                             f"range of {self.total}")

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> this rank's indices, -1 for experts elsewhere."""
        if self.whole:
            return ids
        shifted = ids - self.start
        return torch.where((shifted >= 0) & (shifted < self.local), shifted,
                           torch.full_like(shifted, -1))


class FusedMoE(DeviceDispatch):
    """Routes each token to its top-k experts and sums their weighted SwiGLU outputs."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, group: ParallelGroup = SINGLE,
                 experts: ExpertRange | None = None) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.group = top_k, renormalize, group
        split_experts = group.expert_parallel and group.size > 1
        if experts is None and split_experts:  # expert parallelism: whole experts per rank
            start, count = group.split(num_experts)
            experts = ExpertRange(num_experts, start, count)
        self.placement = experts or ExpertRange(num_experts)
        if self.placement.total != num_experts:
            raise ValueError("the expert range does not cover the layer's experts")
        self.intermediate_size = intermediate_size
        # the slice of every expert's width this rank holds: all of it with expert parallelism
        self.width_rank = 0 if split_experts else group.rank
        self.local_inter = intermediate_size if split_experts else \
            group.split(intermediate_size)[1]
        self.hidden_size = hidden_size
        self.holds_codes = self.float8_pieces = False  # see hold_codes, hold_stacked_codes
        self.holds_stacked_codes = False  # see hold_stacked_codes
        self.stacks_refused = False  # a piece did not fit the stacks: floats instead
        self.expert_kernels: nn.ModuleList | None = None
        if not linear_methods_deferred():
            self.hold_floats()

    @property
    def loads_codes(self) -> bool:
        """Whether its loaders take a checkpoint's expert codes (hold_codes,
        hold_stacked_codes) rather than floats."""
        return self.holds_codes or self.holds_stacked_codes

    @property
    def holds_weights(self) -> bool:
        """Whether hold_floats or hold_codes gave the layer its weights."""
        return "gate_up_proj" in self._parameters

    # -- what holds the weights (bound once a quantization format is known) -------------

    def hold_floats(self) -> None:
        """Every expert in the model's dtype, stacked (every device and kernel)."""
        local, total = self.placement.local, self.placement.total
        self.gate_up_proj = new_parameter(local, 2 * self.local_inter, self.hidden_size,
                                          loader=self._load_gate_up)
        self.gate_up_proj.num_pieces = 2 * total
        self.down_proj = new_parameter(local, self.hidden_size, self.local_inter,
                                       loader=self._load_down)
        self.down_proj.num_pieces = total

    def hold_codes(self, float8: bool = False) -> None:
        """Each expert's projections as the checkpoint's codes for a CPU kernel (a GGUF's
        blocks, an integer format's codes or float8 rows: GGUFWeight, GroupCodes, Fp8Rows)
        or as floats where none fits (`float8`: float pieces quantized to float8 rows as they
        come, `--quantization fp8`): an expert's kernels are built once its three pieces have
        come (its unpacked codes are not kept), `expert_kernels` once loading ends. One rank
        holding every expert."""
        if self.placement.local != self.placement.total or self.group.size > 1:
            raise ValueError("experts held as codes are one rank's, whole")
        total = self.placement.total
        self.holds_codes, self.float8_pieces = True, float8
        self.gate_up_proj = self._placeholder(2 * total)
        self.down_proj = self._placeholder(total)
        self.code_pieces: dict[tuple[str, int], Any] = {}
        self.built_experts: list[nn.ModuleList | None] = [None] * total
        self.after_loading = self._collect_expert_kernels

    def hold_dummy_codes(self, random_piece: Callable[..., Any], stacked: bool = False) -> None:
        """hold_codes (or hold_stacked_codes, `stacked`: a GPU's) for dummy weights of a
        format: each expert's pieces made by `random_piece(rows, columns, generator, std)`
        (codes of the format) in init_dummy, with no floats held on the way."""
        if stacked:
            self.hold_stacked_codes()
        else:
            self.hold_codes()
        self.random_piece = random_piece

    def init_dummy(self, generator: torch.Generator, std: float) -> bool:
        """Give every expert here random codes (hold_dummy_codes; weights of mean 0 and
        standard deviation `std`), piece by piece through the loaders; False where the layer
        holds no dummy codes."""
        make = getattr(self, "random_piece", None)
        if make is None:
            return False
        inter, hidden = self.intermediate_size, self.hidden_size
        gate_up, down = self.gate_up_proj, self.down_proj  # their loaders, as a checkpoint's
        first = self.placement.start
        for expert in range(first, first + self.placement.local):
            for param, index, rows, columns in ((gate_up, 2 * expert, inter, hidden),
                                                (gate_up, 2 * expert + 1, inter, hidden),
                                                (down, expert, hidden, inter)):
                param.weight_loader(param, make(rows, columns, generator, std), index)
        return True

    def hold_stacked_codes(self, float8: bool = False) -> None:
        """Every expert's codes stacked for the GPU's fused MoE kernel (ExpertCodes: an FP8
        checkpoint's float8 values, an integer or GGUF checkpoint's codes; `float8`: float
        pieces quantized to float8 rows as they come, `--quantization fp8`, so the experts
        are never all held as floats): a projection's stack is made when its first piece
        comes (its layout then known) and its pieces go in as they come. A piece that does
        not fit (floats, another layout, one the kernel does not take) turns the layer to
        floats: hold_floats, what has come decoded (`stacks_refused`)."""
        total = self.placement.total
        self.holds_stacked_codes, self.float8_pieces = True, float8
        self.stacks: dict[str, Any] = {}
        self.gate_up_proj = self._placeholder(2 * total, partial(self._stack_piece, "gate_up"))
        self.down_proj = self._placeholder(total, partial(self._stack_piece, "down"))
        self.after_loading = self._hold_stacks

    def stacked_experts(self) -> tuple[Any, Any]:
        """(gate-up, down) for the GPU kernel: the stacked floats, or ExpertCodes."""
        if not self.holds_stacked_codes:
            return self.gate_up_proj, self.down_proj
        from pagoda.layers.moe.expert_codes import ExpertCodes
        return tuple(ExpertCodes(getattr(self, f"{kind}_proj"), getattr(self, f"{kind}_scale"),
                                 getattr(self, f"{kind}_low", None), self.code_bits[kind])
                     for kind in ("gate_up", "down"))

    def quantize_experts(self, layout: tuple[int, int] | None = None) -> None:
        """Floats -> float8 values with a scale a row (the quantization of `--quantization
        fp8`), or to (bits, group) integer codes, expert by expert (moe_bench's codes of the
        same weights)."""
        from pagoda.layers.moe.expert_codes import quantized_float8, quantized_integers
        self.stacks = {kind: quantized_float8(getattr(self, f"{kind}_proj")) if layout is None
                       else quantized_integers(getattr(self, f"{kind}_proj"), *layout)
                       for kind in ("gate_up", "down")}
        self._hold_stacks()

    def _stack_piece(self, kind: str, param: nn.Parameter, piece: Any,
                     index: int | None = None) -> None:
        if self.holds_stacked_codes:
            if index is None and self._quantizes(piece):  # every expert's floats in one
                self._store_packed(param, piece)
                return
            piece = self._float8_piece(piece)
            if index is not None and self._stacked(kind, piece, index):
                return
            self._stacks_to_floats()
        target = getattr(self, f"{kind}_proj")  # floats from here on
        decoded = getattr(piece, "decoded", None)
        target.weight_loader(target, decoded() if decoded is not None else piece, index)

    def _stacked(self, kind: str, piece: Any, index: int) -> bool:
        """Put this rank's part of an expert's piece in its stack (made from the first);
        False where it does not fit."""
        from pagoda.layers.moe import expert_codes
        expert = self._local_expert(index // 2 if kind == "gate_up" else index)
        if expert is None:
            return True  # another rank's expert
        part = self._rank_piece(kind, piece)
        rows, inputs = self._stack_shape(kind)
        if part is None or not expert_codes.takes(part, inputs):
            return False
        stack = self.stacks.get(kind)
        if stack is None:
            stack = self.stacks[kind] = expert_codes.empty_stack(
                part, self.placement.local, rows, inputs, self.gate_up_proj.device)
        if not expert_codes.same_layout(stack, part):
            return False
        expert_codes.put(stack, expert, index % 2 * self.local_inter if kind == "gate_up"
                         else 0, part)
        return True

    def _stack_shape(self, kind: str) -> tuple[int, int]:
        """(rows, inputs) of one expert's stacked projection on this rank."""
        return (2 * self.local_inter, self.hidden_size) if kind == "gate_up" else \
            (self.hidden_size, self.local_inter)

    def _rank_piece(self, kind: str, piece: Any) -> Any:
        """This rank's part of an expert's piece (Fp8Rows, GroupCodes; else as it is), its
        shape checked; None where its groups do not split as the rank's slice does."""
        from pagoda.layers.moe.expert_codes import narrowed
        from pagoda.layers.quantization.cpu_block_dot import GroupCodes
        from pagoda.layers.quantization.cpu_fp8_dot import Fp8Rows
        if not isinstance(piece, (Fp8Rows, GroupCodes)):
            return piece
        self._check_piece_shape(kind, piece)
        if self.local_inter == self.intermediate_size:
            return piece
        return narrowed(piece, 0 if kind == "gate_up" else 1,
                        self.width_rank * self.local_inter, self.local_inter)

    def _stacks_to_floats(self) -> None:
        """The layer holds floats (a piece did not fit the stacks): what has come decoded
        (the loader says so in one line for every such layer)."""
        stacks = self.stacks
        self.holds_stacked_codes, self.stacks, self.stacks_refused = False, {}, True
        del self.after_loading
        self.hold_floats()
        for kind, stack in stacks.items():
            target = getattr(self, f"{kind}_proj")
            for expert in range(stack.shape[0]):
                target.data[expert] = stack.decoded(expert, target.dtype)

    def _hold_stacks(self) -> None:
        """The stacks as the layer's parameters (once loading ends)."""
        from pagoda.layers.moe.expert_codes import kernel_name
        if set(self.stacks) != {"gate_up", "down"}:
            raise ValueError("experts lack some of their projections")
        self.holds_stacked_codes = True
        self.code_bits = {}
        for kind, stack in self.stacks.items():
            for name, tensor in (("proj", stack.codes), ("scale", stack.scale),
                                 ("low", stack.low)):
                if tensor is not None:
                    setattr(self, f"{kind}_{name}", nn.Parameter(tensor, requires_grad=False))
            self.code_bits[kind] = stack.bits
        self.kernel_name = kernel_name(self.stacks["gate_up"], self.stacks["down"])
        self.stacks = {}

    def _check_piece_shape(self, kind: str, piece: Any) -> None:
        """One expert's gate or up ("gate_up") is [intermediate, hidden], its down
        [hidden, intermediate] (whole, before a rank's slice)."""
        rows, columns = (self.intermediate_size, self.hidden_size) if kind == "gate_up" \
            else (self.hidden_size, self.intermediate_size)
        if tuple(piece.shape) != (rows, columns):
            raise ValueError(f"expert tensor of shape {tuple(piece.shape)} does not fit "
                             f"[{rows}, {columns}]")

    def _placeholder(self, pieces: int, loader: Any = None) -> nn.Parameter:
        """An empty parameter each expert's piece loads through (by default kept in
        code_pieces)."""
        param = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        param.weight_loader = loader or self._store_piece
        param.num_pieces = pieces
        param.gguf_blocks = keeps_expert_blocks
        return param

    def _store_piece(self, param: nn.Parameter, piece: Any, index: int | None = None) -> None:
        if index is None:  # every expert's floats packed in one tensor (transformers 5)
            self._store_packed(param, piece)
            return
        kind = "gate_up" if param is self.gate_up_proj else "down"
        self._check_piece_shape(kind, piece)
        piece = self._float8_piece(piece)
        self.code_pieces[(kind, index)] = piece
        expert = index // 2 if kind == "gate_up" else index
        keys = (("gate_up", 2 * expert), ("gate_up", 2 * expert + 1), ("down", expert))
        if all(key in self.code_pieces for key in keys):
            gate, up, down = (self.code_pieces.pop(key) for key in keys)
            self.built_experts[expert] = nn.ModuleList([expert_kernel([gate, up]),
                                                        expert_kernel([down])])

    def _quantizes(self, piece: Any) -> bool:
        """Whether `piece` is floats the layer quantizes as they come (`float8_pieces`)."""
        return self.float8_pieces and isinstance(piece, torch.Tensor)

    def _float8_piece(self, piece: Any) -> Any:
        """A piece as the layer takes it: floats it quantizes as float8 rows on its device
        (`--quantization fp8`), anything else as it is."""
        if not self._quantizes(piece):
            return piece
        from pagoda.layers.quantization.fp8 import float8_rows_at_load
        return float8_rows_at_load(piece.to(self.gate_up_proj.device))

    def _store_packed(self, param: nn.Parameter, packed: torch.Tensor) -> None:
        """Each expert's pieces of a packed float tensor ([experts, 2 * inter, hidden]: its
        gate rows, then its up rows; or [experts, hidden, inter]) through the loader."""
        inter, load = self.intermediate_size, param.weight_loader
        for expert, stack in enumerate(self._packed_local(packed), self.placement.start):
            if param is self.gate_up_proj:
                load(param, stack.narrow(0, 0, inter), 2 * expert)
                load(param, stack.narrow(0, inter, inter), 2 * expert + 1)
            else:
                load(param, stack, expert)

    def _collect_expert_kernels(self) -> None:
        missing = [e for e, kernels in enumerate(self.built_experts) if kernels is None]
        if missing:
            raise ValueError(f"experts {missing[:5]} lack some of their projections")
        self.expert_kernels = nn.ModuleList(self.built_experts)
        self.built_experts = []

    # -- loading -------------------------------------------------------------------------

    def _local_expert(self, expert: int) -> int | None:
        index = expert - self.placement.start
        return index if 0 <= index < self.placement.local else None

    def _rank_part(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of an expert's intermediate dim."""
        return tensor.narrow(dim, self.width_rank * self.local_inter, self.local_inter)

    def _packed_local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The experts of a packed [experts, ...] tensor that live here."""
        if tensor.shape[0] != self.placement.total:
            raise ValueError(f"packed experts of shape {tuple(tensor.shape)} do not hold "
                             f"{self.placement.total} experts")
        return tensor.narrow(0, self.placement.start, self.placement.local)

    def _load_gate_up(self, param: nn.Parameter, tensor: torch.Tensor,
                      piece: int | None = None) -> None:
        inter = self.local_inter
        if piece is None:  # packed [experts, 2 * inter, hidden]: gate rows, then up rows
            full = self.intermediate_size
            local = self._packed_local(tensor)
            for half in (0, 1):
                part = self._rank_part(local.narrow(1, half * full, full), 1)
                copy_checked(param.data.narrow(1, half * inter, inter), part)
            return
        index = self._local_expert(piece // 2)
        if index is not None:  # one expert's gate (even piece) or up (odd) [inter, hidden]
            copy_checked(param.data[index].narrow(0, piece % 2 * inter, inter),
                         self._rank_part(tensor, 0))

    def _load_down(self, param: nn.Parameter, tensor: torch.Tensor,
                   piece: int | None = None) -> None:
        if piece is None:  # packed [experts, hidden, inter]
            copy_checked(param, self._rank_part(self._packed_local(tensor), 2))
            return
        index = self._local_expert(piece)
        if index is not None:  # one expert's [hidden, inter]
            copy_checked(param.data[index], self._rank_part(tensor, 1))

    # -- compute -------------------------------------------------------------------------

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 weights, local expert ids or -1) [tokens, top_k]."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return weights, self.placement.local_ids(ids)

    def forward_native(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(router_logits)
        if self.holds_stacked_codes:  # (the GPU's reference path) each call decodes them
            stacks = [torch.stack([codes.decoded(e, x.dtype) for e in range(codes.shape[0])])
                      for codes in self.stacked_experts()]
            out = fused_moe_native(x, *stacks, weights, ids)
        elif self.expert_kernels is None:
            out = fused_moe_native(x, self.gate_up_proj, self.down_proj, weights, ids)
        else:
            kernels = self.expert_kernels
            out = moe_by_expert(x, lambda e, rows: kernels[e][0](rows),
                                lambda e, rows: kernels[e][1](rows), weights, ids, len(kernels))
        return self.group.all_reduce(out)

    def forward_with_router(self, x: torch.Tensor, router: LinearBase) -> torch.Tensor:
        """The layer from the hidden states and the router layer. On CUDA a decode batch
        with an unquantized router (x's dtype, no bias) takes the router's product in the
        routing launch; otherwise the router's logits come first."""
        if x.is_cuda and type(router.method) is UnquantizedLinearMethod \
                and router.bias is None and router.weight.dtype == x.dtype:
            from pagoda.layers.moe import triton_moe
            if triton_moe.takes_router(x.shape[0], x.shape[1]):
                out = triton_moe.fused_moe_from_router(
                    x, router.weight, *self.stacked_experts(), self.top_k, self.renormalize,
                    self.placement.start, partial=not self.placement.whole)
                return self.group.all_reduce(out)
        return self(x, router(x))

    def forward_cuda(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.expert_kernels is not None:
            raise ValueError("experts held as codes run on CPU")
        from pagoda.layers.moe.triton_moe import fused_moe_routed
        out = fused_moe_routed(x, router_logits, *self.stacked_experts(), self.top_k,
                               self.renormalize, self.placement.start,
                               partial=not self.placement.whole)
        return self.group.all_reduce(out)


def keeps_expert_blocks(type_name: str) -> bool:
    """Whether an expert held as codes keeps a GGUF type's blocks (any type pagoda decodes:
    they become codes, or floats where the kernel holds none of their shape)."""
    from pagoda.layers.quantization.gguf_blocks import FORMATS
    return type_name in FORMATS


def expert_kernel(pieces: list[Any]) -> nn.Module:
    """One module computing x W^T for `pieces` stacked by rows (an expert's gate and up, or
    its down): the CPU kernel of their codes (block-dot for GroupCodes and GGUF blocks, the
    float8 one for Fp8Rows) where it holds them together, else their float weights
    (codes decoded, floats as they are)."""
    from pagoda.layers.quantization.base import DenseWeight
    from pagoda.layers.quantization.cpu_block_dot import GroupCodes, stacked_kernel
    from pagoda.layers.quantization.cpu_fp8_dot import Fp8Rows, stacked_fp8_kernel
    from pagoda.layers.quantization.gguf import GGUFWeight, group_codes
    codes = [group_codes(p) if isinstance(p, GGUFWeight) else p for p in pieces]
    stackers = {GroupCodes: stacked_kernel, Fp8Rows: stacked_fp8_kernel}
    kind = type(codes[0])
    if kind in stackers and all(type(c) is kind for c in codes):
        kernel = stackers[kind](codes)
        if kernel is not None:
            return kernel
    floats = [c.float() if isinstance(c, torch.Tensor) else c.decoded() for c in codes]
    return DenseWeight(torch.cat(floats).to(torch.get_default_dtype()))
