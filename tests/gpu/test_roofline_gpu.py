"""The roofline's ceilings measured on the GPU (device only)."""

from __future__ import annotations

import pytest
import torch

from pagoda.bench.roofline import measure_ceilings


def test_the_float8_rate_is_measured_where_the_tensor_cores_have_it(gpu_report):
    """With float8 asked, a GPU of compute capability 8.9 or later measures its float8
    products' rate, faster than the bfloat16 one (Hopper's float8 tensor cores double it);
    an older one measures none; not asked, none."""
    device = torch.device("cuda")
    ceilings = measure_ceilings(device, torch.bfloat16, float8=True)
    gpu_report(bandwidth_gb_s=ceilings.bandwidth / 1e9,
               matmul_tflops=ceilings.matmul_flops / 1e12,
               float8_matmul_tflops=(ceilings.float8_matmul_flops or 0) / 1e12)
    if torch.cuda.get_device_capability(device) < (8, 9):
        assert ceilings.float8_matmul_flops is None
        pytest.skip("no float8 tensor cores")
    assert ceilings.float8_matmul_flops > 1.3 * ceilings.matmul_flops
    assert measure_ceilings(device, torch.bfloat16).float8_matmul_flops is None
