"""Programmatic dependent launch: on where the GPU has it (and PAGODA_PDL is not 0), off on
CPU; every Triton kernel of the model's layers (not LoRA's) takes the PDL switch, and with
it on, compiled for sm_90 here, waits for the previous kernel before its first load or
store. That the kernels give the same results with it is checked on the GPU (tests/gpu)."""

from __future__ import annotations

import re

import pytest
import torch
import triton

from pagoda.layers import dependent_launch as launch
from pagoda.layers import fused
from pagoda.layers.attention import triton_kv_store, triton_unified
from pagoda.layers.moe import triton_moe
from pagoda.layers.quantization import triton_group_gemm
from pagoda.layers.triton_support import cuda_capability
from tests.utils import compile_for_cuda

FORWARD_PASS_MODULES = (fused, triton_kv_store, triton_unified, triton_moe, triton_group_gemm)


@pytest.fixture
def capability(monkeypatch):
    """Pretend a CUDA device of the given capability (the cache of answers cleared)."""
    def pretend(major_minor: tuple[int, int]) -> None:
        launch._enabled.cache_clear()
        cuda_capability.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: major_minor)
    yield pretend
    launch._enabled.cache_clear()
    cuda_capability.cache_clear()


def test_off_on_cpu():
    assert launch.dependent_launch(torch.device("cpu")) == {"PDL": False}


def test_on_from_hopper_on_unless_turned_off_or_rocm(capability, monkeypatch):
    gpu = torch.device("cuda", 0)
    capability((9, 0))
    assert launch.dependent_launch(gpu) == {"PDL": True, "launch_pdl": True}
    capability((8, 9))
    assert launch.dependent_launch(gpu) == {"PDL": False}
    monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm reports gfx9 as 9.x
    capability((9, 4))
    assert launch.dependent_launch(gpu) == {"PDL": False}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setenv("PAGODA_PDL", "0")
    capability((9, 0))
    assert launch.dependent_launch(gpu) == {"PDL": False}


def test_every_forward_pass_kernel_takes_the_switch():
    kernels = [value for module in FORWARD_PASS_MODULES for name, value in vars(module).items()
               if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel")]
    assert len(kernels) >= 19
    missing = [kernel.__name__ for kernel in kernels if "PDL" not in kernel.arg_names]
    assert not missing


def test_a_kernel_compiled_with_it_waits_before_touching_memory():
    signature = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
                 "res_out_ptr": "*bf16", "scale_ptr": "*fp32", "n_cols": "i32", "eps": "fp32"}
    ptx = compile_for_cuda(fused._add_rms_norm_kernel, signature,
                           {"HAS_RESIDUAL": True, "BLOCK": 4096, "PDL": True,
                            "FP8_MAX": 0.0})["ptx"]
    first_access = re.search(r"\b(ld|st)\.global", ptx).start()
    assert -1 < ptx.find("griddepcontrol.wait") < ptx.find("griddepcontrol.launch_dependents") \
        < first_access
