"""The chunked greedy argmax on the GPU: the interpreter's cases, and Llama 3's vocabulary at
decode batch sizes, against torch's argmax (device only)."""

from __future__ import annotations

import pytest
import torch

from tests.sampling.test_greedy import expected, mismatches


def test_the_interpreter_cases_on_the_gpu():
    found = mismatches("cuda")
    assert all(rows == [] for rows in found.values()), found


@pytest.mark.parametrize("rows", [1, 7, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_real_vocabulary(rows, dtype):
    from pagoda.sampling.greedy import greedy_tokens
    logits = torch.randn(rows, 128256, device="cuda").to(dtype)
    logits[0, 70000] = logits[0, 3] = 50.0  # a tie across chunks: the first
    got = greedy_tokens(logits)
    assert torch.equal(got, expected(logits)) and got[0].item() == 3
