"""What the CPU kernels are handed: float32 rows one after another, without a copy where the
activations already are; their calls noted, to be made again on the same memory; builds keyed
by the headers their sources include."""

from __future__ import annotations

import shutil

import pytest
import torch

from pagoda.layers import cpu_fused, cpu_kernels
from pagoda.layers.cpu_kernels import float32_rows, recording_kernel_calls, run_kernel


def test_contiguous_float32_activations_are_read_in_place():
    x = torch.randn(2, 3, 8)
    assert float32_rows(x) is x


def test_other_dtypes_and_strided_views_are_copied_to_contiguous_float32():
    for x in (torch.randn(3, 8).to(torch.bfloat16), torch.randn(3, 16)[:, ::2]):
        rows = float32_rows(x)
        assert rows.dtype == torch.float32 and rows.is_contiguous()
        assert torch.equal(rows, x.float())


def test_calls_are_noted_only_while_recording():
    noted = []
    run_kernel(noted.append, "before")
    with recording_kernel_calls() as calls:
        run_kernel(noted.append, "during")
    run_kernel(noted.append, "after")
    assert noted == ["before", "during", "after"]  # each ran once, as called
    assert calls == [(noted.append, ("during",))]


def test_a_noted_kernel_call_made_again_redoes_its_work_on_new_values():
    if not cpu_fused.available():
        pytest.skip("the CPU fused-layer kernel does not build here")
    x, residual, weight = torch.randn(3, 64), torch.randn(3, 64), torch.rand(64)
    with recording_kernel_calls() as calls:
        out, summed = cpu_fused.add_rms_norm(x, residual, weight, 1e-6)
    assert len(calls) == 1
    x.copy_(torch.randn(3, 64))  # new inputs in the same memory
    function, args = calls[0]
    function(*args)
    expected, expected_sum = cpu_fused.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(out, expected) and torch.equal(summed, expected_sum)


def test_a_build_is_keyed_by_the_local_headers_its_source_includes(tmp_path, monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path / "home"))
    (tmp_path / "math.h").write_text("inline float one() { return 1.0f; }\n")
    source = tmp_path / "kernel.cpp"
    source.write_text('#include "math.h"\nextern "C" int supported() { return 1; }\n')
    before = cpu_kernels._library_path(source, "g++", ("-O2",))
    (tmp_path / "math.h").write_text("inline float one() { return 1.0f + 0.0f; }\n")
    assert cpu_kernels._library_path(source, "g++", ("-O2",)) != before
