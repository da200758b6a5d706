"""The L2 prefetch ahead of a product (`pagoda.layers.l2_prefetch`): its kernel compiled for
sm_90 with no GPU, the programs each tensor gets, which tensors a module gives, and that it
launches nothing where it is off. tests/gpu/test_l2_prefetch_gpu.py runs it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagoda.layers import l2_prefetch
from pagoda.layers.l2_prefetch import CHUNK_BYTES, LANES, MAX_TENSORS
from tests.utils import compile_for_cuda

SIGNATURE = {name: kind for index in "abcd"
             for name, kind in ((index, "*i8"), (f"{index}_bytes", "i64"))}
SIGNATURE.update(a_end="i32", b_end="i32", c_end="i32")


@pytest.mark.parametrize("pdl", [True, False])
def test_the_kernel_asks_l2_for_its_chunks_before_it_waits(pdl):
    ptx = compile_for_cuda(l2_prefetch._prefetch_kernel, SIGNATURE,
                           {"CHUNK": CHUNK_BYTES, "LANES": LANES, "PDL": pdl},
                           num_warps=1)["ptx"]
    lines = ptx.splitlines()
    asks = [i for i, line in enumerate(lines) if "cp.async.bulk.prefetch.L2.global" in line]
    waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    assert asks  # (branches the compiler may merge)
    if pdl:
        assert len(waits) == 1 and max(asks) < waits[0]
    else:
        assert not waits


def test_each_tensor_gets_the_programs_its_chunks_need():
    per_program = CHUNK_BYTES * LANES
    sizes = [per_program * 3 + 16, 16, per_program]
    assert l2_prefetch.program_ends(sizes) == [4, 5, 6, 6]
    assert l2_prefetch.program_ends([1]) == [1] * MAX_TENSORS


def test_a_module_gives_its_largest_tensors():
    layer = nn.Linear(64, 32, bias=True)
    layer.register_buffer("scale", torch.ones(32, 2))
    layer.register_buffer("nothing", torch.empty(0))
    tensors = l2_prefetch.weight_tensors(layer)
    assert [tuple(t.shape) for t in tensors] == [(32, 64), (32, 2), (32,)]


def test_nothing_is_launched_on_cpu_or_past_a_few_tokens(monkeypatch):
    launched = []
    monkeypatch.setattr(l2_prefetch, "launch", launched.append)
    monkeypatch.setenv("PAGODA_L2_PREFETCH", "1")
    l2_prefetch._points.cache_clear()
    try:
        layer = nn.Linear(64, 32)
        l2_prefetch.prefetch(layer, 1, "o")
        l2_prefetch.prefetch(layer, l2_prefetch.MAX_TOKENS + 1, "o")
        assert not l2_prefetch.enabled(torch.device("cpu"), "o")
    finally:
        l2_prefetch._points.cache_clear()
    assert not launched


@pytest.mark.parametrize("named, points", [("0", set()), ("1", {"o", "qkv"}), ("o", {"o"}),
                                           ("qkv,o", {"o", "qkv"}), ("o,nothing", {"o"})])
def test_the_variable_names_the_points(named, points, monkeypatch):
    monkeypatch.setenv("PAGODA_L2_PREFETCH", named)
    monkeypatch.setattr(l2_prefetch, "cuda_capability", lambda index: (9, 0))
    l2_prefetch._points.cache_clear()
    try:
        assert l2_prefetch._points(0) == points
        monkeypatch.setattr(l2_prefetch, "cuda_capability", lambda index: (8, 0))
        l2_prefetch._points.cache_clear()
        assert l2_prefetch._points(0) == set()
    finally:
        l2_prefetch._points.cache_clear()
