"""Fused layers on CPU through pagoda's own kernel (`cpu_fused.cpp`), in float32: the residual
add with RMSNorm (and RMSNorm of each head of q or k), RoPE in place on q and k, and the
gated activations (SiLU or GELU-tanh of the gate times up), each one call where the torch
path makes two to eight (on a small model's decode much of a layer's time is those calls'
dispatch, and on a prefill their passes over memory). The activations' exponential is a
polynomial (`cpu_math.h`) within a few units in the last place.

Compiled at first use (`pagoda.layers.cpu_kernels`) with AVX-512 flags, else AVX2 ones, else
none. Without a compiler, for other dtypes or layouts, or with `PAGODA_CPU_FUSED=0`, the
layers run their torch path (`forward_native`, also the reference the kernel is tested
against)."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from pagoda.layers.cpu_kernels import load_chosen_kernel, run_kernel
from pagoda.logger import get_logger

logger = get_logger(__name__)

SOURCE = Path(__file__).with_name("cpu_fused.cpp")
# the builds, best first: each runs where its pagoda_fused_supported() says so; none
# contracts a * b + c into one fused multiply-add (g++'s default for C++ would), so the
# products round as torch's do
NO_CONTRACTION = "-ffp-contract=off"
BUILDS = {"avx512": ("-mavx512f", NO_CONTRACTION), "avx2": ("-mavx2", NO_CONTRACTION),
          "generic": (NO_CONTRACTION,)}
VARIABLE = "PAGODA_CPU_FUSED"


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.pagoda_add_rms_norm.argtypes = [pointer, pointer, pointer, size, size,
                                            ctypes.c_float, pointer, pointer, flag]
    library.pagoda_rope.argtypes = [pointer, pointer, pointer, pointer, size, size, size, size,
                                    size, size, size, size, flag]
    library.pagoda_rms_norm_heads.argtypes = [pointer, size, size, size, size, pointer,
                                              ctypes.c_float, pointer, flag]
    library.pagoda_rms_norm_heads.restype = None
    for gated in (library.pagoda_silu_and_mul, library.pagoda_gelu_tanh_and_mul):
        gated.argtypes = [pointer, size, size, size, pointer, flag]
        gated.restype = None
    library.pagoda_add_rms_norm.restype = library.pagoda_rope.restype = None
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The best build this CPU runs, or None (with one log line). PAGODA_CPU_FUSED: 0 turns
    the kernel off, a build's name picks it."""
    library = load_chosen_kernel(VARIABLE, SOURCE, BUILDS, "pagoda_fused_supported",
                                 "CPU fused-layer kernel",
                                 "norms and RoPE run as torch operators", logger)
    return None if library is None else _bind(library)


def available() -> bool:
    """Whether the kernel runs on this machine (built, or built now)."""
    return _library() is not None


def takes_norm(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether add_rms_norm takes these: contiguous float32 CPU tensors, the kernel built."""
    return (x.is_cpu and x.dtype == torch.float32 and x.is_contiguous()
            and (residual is None or (residual.dtype == torch.float32
                                      and residual.is_contiguous()
                                      and residual.shape == x.shape))
            and _library() is not None)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h) * weight, h) with h = x + residual (x without one), over the last
    dimension: RMSNorm.forward_native's results."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    weight = weight.float().contiguous()
    run_kernel(
        _library().pagoda_add_rms_norm, x.data_ptr(),
        None if residual is None else residual.data_ptr(), weight.data_ptr(), rows, cols, eps,
        out.data_ptr(), None if residual is None else summed.data_ptr(),
        torch.get_num_threads())
    return out, summed


def takes_heads(x: torch.Tensor) -> bool:
    """Whether rms_norm_heads takes x: float32 CPU [tokens, heads, dim], each token's heads
    contiguous, the kernel built."""
    return (x.is_cpu and x.dtype == torch.float32 and x.dim() == 3 and len(x) > 0
            and x[0].is_contiguous() and _library() is not None)


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each head of x [tokens, heads, dim] (a view of a qkv row, read in place),
    into a new contiguous tensor: add_rms_norm's results without a residual."""
    tokens, heads, dim = x.shape
    out = torch.empty(tokens, heads, dim)
    weight = weight.float().contiguous()
    run_kernel(_library().pagoda_rms_norm_heads, x.data_ptr(), tokens, heads, dim,
               x.stride(0), weight.data_ptr(), eps, out.data_ptr(), torch.get_num_threads())
    return out


def takes_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin: torch.Tensor) -> bool:
    """Whether rope_ takes these: float32 CPU q and k [tokens, heads, dim] with contiguous
    heads, int64 positions, a float32 contiguous table, the kernel built."""
    return (q.is_cpu and q.dtype == k.dtype == cos_sin.dtype == torch.float32
            and positions.dtype == torch.int64 and positions.is_contiguous()
            and q.dim() == k.dim() == 3 and q.stride(2) == k.stride(2) == 1
            and q.stride(1) == q.shape[2] and k.stride(1) == k.shape[2]
            and cos_sin.is_contiguous() and _library() is not None)


def rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
          rotary_dim: int) -> None:
    """Rotate-half RoPE in place on q [tokens, heads, dim] and k [tokens, kv_heads, dim] at
    `positions` (cos_sin [max_position, rotary_dim] = [cos | sin])."""
    tokens, q_heads, head_dim = q.shape
    run_kernel(
        _library().pagoda_rope, positions.data_ptr(), q.data_ptr(), k.data_ptr(),
        cos_sin.data_ptr(), tokens, q_heads, k.shape[1], head_dim, rotary_dim, q.stride(0),
        k.stride(0), cos_sin.stride(0), torch.get_num_threads())


GATED = ("silu", "gelu_tanh")  # the gated activations the kernel runs


def takes_gated(x: torch.Tensor) -> bool:
    """Whether gated takes x: float32 CPU [..., 2 * width], contiguous (or [tokens, 2 * width]
    with contiguous rows), the kernel built."""
    return (x.is_cpu and x.dtype == torch.float32 and x.dim() >= 1 and x.shape[-1] % 2 == 0
            and (x.is_contiguous() or (x.dim() == 2 and x.stride(1) == 1))
            and _library() is not None)


def gated(activation: str, x: torch.Tensor) -> torch.Tensor:
    """activation(gate) * up for x = [gate | up] on the last dim (an activation of GATED)."""
    width = x.shape[-1] // 2
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out = torch.empty(*x.shape[:-1], width)
    if activation not in GATED:
        raise ValueError(f"no gated activation {activation!r}; the kernel runs {GATED}")
    run_kernel(getattr(_library(), f"pagoda_{activation}_and_mul"), rows.data_ptr(),
               rows.shape[0], width, rows.stride(0), out.data_ptr(), torch.get_num_threads())
    return out
