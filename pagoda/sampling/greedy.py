"""Greedy token choice: each row's argmax over the vocabulary.

On a GPU torch's argmax of one row is one block of threads walking 128k logits (27 us a
decode step of Llama 3's vocabulary on an H100); here the vocabulary is cut into CHUNK-wide
pieces, a program each takes its piece's largest logit and where it lies, and a second launch
takes each row's largest of those. It reads the logits in their own type (a float copy would
be one more launch) and, as torch, returns the first of equal largest values; a NaN counts as
+inf (where torch's argmax would prefer it to an earlier +inf). The CPU, and tensors Triton
does not take, use torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # logits a program of the first launch reads
_MAX_CHUNKS = 1024  # rows of up to 4M logits (every vocabulary), the second launch's width


@triton.jit
def _chunk_best_kernel(logits_ptr, stride_row, vocab, best_ptr, where_ptr, chunks,
                       CHUNK: tl.constexpr):
    """The largest logit of one CHUNK of one row (NaN counted largest) and its index."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    at = chunk * CHUNK + tl.arange(0, CHUNK)
    values = tl.load(logits_ptr + row.to(tl.int64) * stride_row + at, mask=at < vocab,
                     other=float("-inf")).to(tl.float32)
    values = tl.where(values != values, float("inf"), values)
    where = tl.argmax(values, 0, tie_break_left=True)
    best = tl.max(values, 0)
    tl.store(best_ptr + row * chunks + chunk, best)
    tl.store(where_ptr + row * chunks + chunk, chunk * CHUNK + where)


@triton.jit
def _row_best_kernel(best_ptr, where_ptr, out_ptr, chunks, CHUNKS_P: tl.constexpr):
    """The index of a row's largest logit, from its chunks' (the first chunk of a tie)."""
    row = tl.program_id(0)
    chunk = tl.arange(0, CHUNKS_P)
    best = tl.load(best_ptr + row * chunks + chunk, mask=chunk < chunks, other=float("-inf"))
    first = tl.argmax(best, 0, tie_break_left=True)
    tl.store(out_ptr + row, tl.load(where_ptr + row * chunks + first).to(tl.int64))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of `logits` [rows, vocab] (int64, [rows])."""
    if not (logits.is_cuda and takes(logits)):
        return logits.argmax(-1)
    return chunked_argmax(logits)


def takes(logits: torch.Tensor) -> bool:
    """Whether the kernels take `logits` (a GPU's, or the CPU's under Triton's interpreter)."""
    return (logits.dim() == 2 and logits.shape[0] > 0 and logits.stride(1) == 1
            and 0 < logits.shape[1] <= CHUNK * _MAX_CHUNKS
            and logits.dtype in (torch.float32, torch.float16, torch.bfloat16))


def chunked_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The two launches' argmax of each row of `logits` (as `takes` allows)."""
    rows, vocab = logits.shape
    chunks = triton.cdiv(vocab, CHUNK)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    where = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _chunk_best_kernel[(rows, chunks)](logits, logits.stride(0), vocab, best, where, chunks,
                                       CHUNK=CHUNK, num_warps=8)
    _row_best_kernel[(rows,)](best, where, out, chunks,
                              CHUNKS_P=max(16, triton.next_power_of_2(chunks)), num_warps=4)
    return out

