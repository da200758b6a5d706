"""Decode attention on CPU through pagoda's own kernel (`cpu_decode_attention.cpp`): each
single-token sequence's query against its keys and values where they lie in the paged cache,
with a running softmax a block at a time, in float32. The torch path gathers every
sequence's slots into a padded copy and runs one masked SDPA call over it; the kernel reads
each cached row once.

Compiled at first use (`pagoda.layers.cpu_kernels`) with AVX-512 flags, else AVX2 ones, else
none (any CPU the compiler targets). Without a compiler, for caches other than float32,
bfloat16 and float8 (E4M3, E5M2), or with `PAGODA_CPU_DECODE_ATTENTION=0`, the torch backend
gathers and runs SDPA."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from pagoda.layers.cpu_kernels import float32_rows, load_chosen_kernel, run_kernel
from pagoda.logger import get_logger

logger = get_logger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode_attention.cpp")
# the builds, best first: each runs where its pagoda_decode_attention_supported() says so
BUILDS = {"avx512": ("-mavx512f", "-mfma"), "avx2": ("-mavx2", "-mfma"), "generic": ()}
# the caches it reads, by the kernel's code for each
CACHE_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}
VARIABLE = "PAGODA_CPU_DECODE_ATTENTION"


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.pagoda_decode_attention.argtypes = [
        pointer, size, pointer, pointer, flag, size, size, pointer, size, pointer, pointer, size,
        size, size, size, size, ctypes.c_float, pointer, flag]
    library.pagoda_store_rows.argtypes = [pointer, flag, size, pointer, pointer, size, size,
                                          size]
    library.pagoda_decode_attention.restype = library.pagoda_store_rows.restype = None
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The best build this CPU runs, or None (with one log line). PAGODA_CPU_DECODE_ATTENTION:
    0 turns the kernel off, a build's name picks it."""
    library = load_chosen_kernel(VARIABLE, SOURCE, BUILDS, "pagoda_decode_attention_supported",
                                 "CPU decode-attention kernel",
                                 "decode attention gathers the cache and runs torch's SDPA",
                                 logger)
    return None if library is None else _bind(library)


def available() -> bool:
    """Whether the kernel runs on this machine (built, or built now)."""
    return _library() is not None


def runs(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """Whether the kernel takes this call: tensors on CPU, float32, bfloat16 or float8 caches
    of the same strides with contiguous rows, and the kernel built for this machine."""
    return (query.is_cpu and key_cache.dtype in CACHE_TYPES
            and value_cache.dtype == key_cache.dtype
            and value_cache.stride() == key_cache.stride() and key_cache.stride(-1) == 1
            and _library() is not None)


def decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, firsts: torch.Tensor,
                     block_size: int, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T scale) v for each row of q [n, heads, dim] over its sequence's positions
    [firsts, seq_lens) (int32 [n]); the caches are [slots, kv_heads, dim] (slot = block *
    block_size + position % block_size, blocks from block_tables int32 [n, blocks]). A
    float32 q whose rows hold their heads contiguously is read in place (a view of the qkv
    projection's output), any other q from a copy. Returns [n, heads, dim] float32: `out`
    (contiguous float32, not q's memory) when given."""
    n, heads, dim = q.shape
    kv_heads = key_cache.shape[1]
    in_place = q.dtype == torch.float32 and n > 0 and q[0].is_contiguous()
    query = q if in_place else float32_rows(q)
    tables = block_tables.to(torch.int32).contiguous()
    out = torch.empty(n, heads, dim) if out is None else out
    run_kernel(
        _library().pagoda_decode_attention, query.data_ptr(), query.stride(0),
        key_cache.data_ptr(), value_cache.data_ptr(), CACHE_TYPES[key_cache.dtype],
        key_cache.stride(0), key_cache.stride(1), tables.data_ptr(), tables.stride(0),
        seq_lens.data_ptr(), firsts.data_ptr(), block_size, n, heads, kv_heads, dim, scale,
        out.data_ptr(), torch.get_num_threads())
    return out


STORED_TYPES = (torch.float32, torch.bfloat16)  # the caches store_rows writes


def stores(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether store_rows takes these: a float32 or bfloat16 cache [slots, heads, dim] with
    contiguous slots, int64 slots, float32 rows [tokens, heads, dim] contiguous within a
    token, the kernel built."""
    width = cache.shape[1] * cache.shape[2]
    return (cache.is_cpu and cache.dtype in STORED_TYPES and slots.dtype == torch.int64
            and slots.is_contiguous() and rows.dtype == torch.float32 and len(rows) > 0
            and cache[0].is_contiguous() and rows.shape[1:] == cache.shape[1:]
            and rows[0].is_contiguous() and rows.stride(0) >= width and _library() is not None)


def store_rows(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """cache[slots] = rows, where `stores` says so; a negative slot writes nothing."""
    run_kernel(_library().pagoda_store_rows, cache.data_ptr(), CACHE_TYPES[cache.dtype],
               cache.stride(0), slots.data_ptr(), rows.data_ptr(), rows.shape[0],
               cache.shape[1] * cache.shape[2], rows.stride(0))
