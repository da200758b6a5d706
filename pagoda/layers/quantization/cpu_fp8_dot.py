"""Float8 (E4M3) weights on CPU through pagoda's own kernel (`cpu_fp8_dot.cpp`, for AVX-512
or AVX2 with F16C): the weights stay one byte each (a quarter of float32's) and are decoded
in registers, multiplied with float32 activations in float32 and scaled per output row (and
column block, for block scales). Weight-only: the products are the dequantized layer's, up
to the order of the sums.

The kernel is compiled at first use (`pagoda.layers.cpu_kernels`): an AVX-512 build, else an
AVX2 one (`PAGODA_CPU_FP8_DOT=avx2` picks it). Without a compiler, on a CPU with neither, or
with `PAGODA_CPU_FP8_DOT=0`, `available()` is False and float8 layers are decoded at load."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pagoda.layers.cpu_kernels import float32_rows, load_chosen_kernel, run_kernel
from pagoda.logger import get_logger

logger = get_logger(__name__)

SOURCE = Path(__file__).with_name("cpu_fp8_dot.cpp")
# the builds, best first: each runs where its pagoda_fp8_dot_supported() says so
BUILDS = {"avx512": ("-mavx512f", "-mavx512bw", "-mfma", "-mf16c"),
          "avx2": ("-mavx2", "-mfma", "-mf16c")}
VARIABLE = "PAGODA_CPU_FP8_DOT"
LANES = 16  # outputs per weight tile
INPUT_STEP = 4  # inputs per step of the kernel's sweep (a group holds whole steps)
FLOAT16_SHIFT = 2.0 ** 8  # the kernel decodes a float8 byte to its value / 2^8


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.pagoda_fp8_dot.argtypes = [pointer, size, size, pointer, pointer, size, size,
                                       pointer, ctypes.c_int]
    library.pagoda_fp8_dot.restype = None
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The best build of the kernel this CPU runs, or None (with one log line) where none
    can run here. PAGODA_CPU_FP8_DOT: 0 turns it off, a build's name (avx2) picks it."""
    library = load_chosen_kernel(VARIABLE, SOURCE, BUILDS, "pagoda_fp8_dot_supported",
                                 "CPU float8 kernel", "float8 weights are decoded at load",
                                 logger)
    return None if library is None else _bind(library)


def available() -> bool:
    """Whether the kernel runs on this machine (built, or built now)."""
    return _library() is not None


def fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the kernel holds this shape: whole tiles of 16 outputs, groups of a multiple
    of 4 inputs dividing the inputs."""
    return (out_features % LANES == 0 and group_size % INPUT_STEP == 0
            and in_features % group_size == 0)


def holds(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the kernel runs on this machine and holds this shape (`fits`)."""
    return fits(out_features, in_features, group_size) and available()


@dataclass(slots=True)
class Fp8Rows:
    """[out, in] float8 weights with a scale per output and group of inputs ([out, groups]):
    what an FP8 checkpoint's tensors give before the kernel holds them."""

    weight: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def decoded(self) -> torch.Tensor:
        """The float32 weights."""
        rows, columns = self.weight.shape
        groups = self.scale.shape[1]
        weights = self.weight.float().view(rows, groups, columns // groups)
        return (weights * self.scale.float()[..., None]).view(rows, columns)


def stacked_fp8_kernel(pieces: list[Fp8Rows]) -> Fp8DotWeight | None:
    """One kernel holding `pieces`' rows one after another, where they share a group size
    and the kernel holds their shape; else None."""
    groups, columns = pieces[0].scale.shape[1], pieces[0].shape[1]
    rows = sum(p.shape[0] for p in pieces)
    if any(p.scale.shape[1] != groups for p in pieces) or \
            not holds(rows, columns, columns // groups):
        return None
    return Fp8DotWeight(torch.cat([p.weight for p in pieces]),
                        torch.cat([p.scale for p in pieces]))


class Fp8DotWeight(nn.Module):
    """[out, in] float8 weights, a scale per output and group of inputs, for the kernel;
    `__call__(x)` is x W^T (W = weight * scale) in x's dtype."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        """`weight` [out, in] float8 (E4M3); `scale` [out, groups] (in / groups inputs a
        group)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        groups = scale.shape[1]
        self.group_size = self.in_features // groups
        if not fits(self.out_features, self.in_features, self.group_size):
            raise ValueError(f"no float8 kernel for [{self.out_features}, "
                             f"{self.in_features}] weights in groups of {self.group_size}")
        tiles = self.out_features // LANES
        codes = weight.view(torch.uint8).reshape(tiles, LANES, self.in_features)
        self.packed = nn.Parameter(codes.transpose(1, 2).contiguous(), requires_grad=False)
        scale = (scale.float() * FLOAT16_SHIFT).reshape(tiles, LANES, groups)
        self.scale = nn.Parameter(scale.transpose(1, 2).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = float32_rows(x)
        out = torch.empty(x.shape[:-1] + (self.out_features,))
        run_kernel(
            _library().pagoda_fp8_dot, flat.data_ptr(), flat.numel() // self.in_features,
            self.in_features, self.packed.data_ptr(), self.scale.data_ptr(), self.out_features,
            self.group_size, out.data_ptr(), torch.get_num_threads())
        return out if x.dtype == torch.float32 else out.to(x.dtype)
