"""Writers of AWQ (4-bit) and GPTQ (4 or 8-bit) tensors, from the formats' documentation
(AutoAWQ's GEMM layout; GPTQ's qweight/qzeros/scales/g_idx), for checkpoints made in the
tests; and the weights those tensors stand for, the reference the loaded layers are checked
against; and loading pieces into a layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass
class Quantized:
    """Codes [out, in] (0..2^bits - 1), zero points and scales [groups, out], each input's
    group."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int = 4

    def weights(self) -> torch.Tensor:
        """[out, in] float32: (code - zero) * scale, each input by its group."""
        zeros = self.zeros[self.g_idx].t().float()
        scales = self.scales[self.g_idx].t().float()
        return (self.codes.float() - zeros) * scales


def quantize(weight: torch.Tensor, group: int, symmetric: bool,
             g_idx: torch.Tensor | None = None, bits: int = 4) -> Quantized:
    """Round-to-nearest quantization to `bits` bits per group of inputs (`g_idx`: each
    input's group, as act-order GPTQ assigns them; default: consecutive runs of `group`)."""
    top, middle = (1 << bits) - 1, 1 << (bits - 1)
    out_features, in_features = weight.shape
    if g_idx is None:
        g_idx = torch.arange(in_features) // group
    groups = int(g_idx.max()) + 1
    zeros = torch.empty(groups, out_features, dtype=torch.int32)
    scales = torch.empty(groups, out_features, dtype=torch.float16)
    codes = torch.empty(out_features, in_features, dtype=torch.int32)
    for g in range(groups):
        cols = (g_idx == g).nonzero().squeeze(1)
        part = weight[:, cols]
        if symmetric:
            scale = (part.abs().amax(1) / (middle - 0.5)).clamp(min=1e-6)
            zero = torch.full((out_features,), middle)
        else:
            low, high = part.amin(1).clamp(max=0), part.amax(1).clamp(min=0)
            scale = ((high - low) / top).clamp(min=1e-6)
            zero = torch.round(-low / scale).clamp(0, top).to(torch.int32)
        scale = scale.half()
        q = torch.round(part / scale.float()[:, None]) + zero[:, None]
        codes[:, cols] = q.clamp(0, top).to(torch.int32)
        zeros[g], scales[g] = zero, scale
    return Quantized(codes, zeros, scales, g_idx.to(torch.int32), bits)


def pack_int32(values: torch.Tensor, dim: int, order: tuple[int, ...] | None = None,
               bits: int = 4) -> torch.Tensor:
    """32 / bits values of `bits` bits per int32 along `dim`; element order[i] of each run
    goes to bits bits * i.. (default: in order)."""
    per = 32 // bits
    values = values.to(torch.int64).movedim(dim, -1)
    runs = values.reshape(*values.shape[:-1], -1, per)
    packed = torch.zeros(runs.shape[:-1], dtype=torch.int64)
    for place, element in enumerate(order or range(per)):
        packed |= runs[..., element] << (bits * place)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # as int32 bits
    return packed.to(torch.int32).movedim(-1, dim)


def awq_tensors(q: Quantized) -> dict[str, torch.Tensor]:
    return {"qweight": pack_int32(q.codes.t(), 1, AWQ_ORDER),
            "qzeros": pack_int32(q.zeros, 1, AWQ_ORDER), "scales": q.scales}


def gptq_tensors(q: Quantized) -> dict[str, torch.Tensor]:
    """The original gptq format: zero points stored minus one."""
    return {"qweight": pack_int32(q.codes.t(), 0, bits=q.bits),
            "qzeros": pack_int32(q.zeros - 1, 1, bits=q.bits), "scales": q.scales,
            "g_idx": q.g_idx}


def load_pieces(layer, pieces: list[dict[str, torch.Tensor]]) -> None:
    """Load each piece (parameter name -> tensor) through the layer's weight loaders, as
    shard i of a fused layer when there are several, then finish the layer's method."""
    for shard, tensors in enumerate(pieces):
        for name, tensor in tensors.items():
            param = getattr(layer, name)
            param.weight_loader(param, tensor, shard if len(pieces) > 1 else None)
    layer.method.process_weights_after_loading(layer)
