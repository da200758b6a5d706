"""Tests of logprob gathering, prompt logprobs and their python output form."""

from __future__ import annotations

import os

import pytest
import torch

from pagoda.outputs import Logprob
from pagoda.sampling.logprobs import (
    LogprobsTensors,
    compute_prompt_logprobs,
    gather_logprobs,
    to_position_logprobs,
)

DEVICE = torch.device(os.environ.get("PAGODA_TEST_DEVICE", "cpu"))


def _random(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _reference_ranks(ref: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 + the number of tokens strictly more likely than the target."""
    return (ref > ref.gather(-1, targets[:, None])).sum(-1) + 1


@pytest.mark.parametrize("num_top", [0, 1, 5])
def test_gather_logprobs_matches_float64_reference(num_top: int) -> None:
    logits = _random(7, 50, seed=1)
    targets = torch.tensor([0, 3, 49, 10, 10, 22, 5])
    ref = logits.double().log_softmax(-1)
    t = gather_logprobs(logits.to(DEVICE).log_softmax(-1), num_top, targets.to(DEVICE))
    assert t.token_ids.shape == (7, num_top + 1) and t.token_ids.dtype == torch.int64
    assert t.logprobs.shape == (7, num_top + 1) and t.logprobs.dtype == torch.float32
    assert t.ranks.shape == (7,)
    assert torch.equal(t.token_ids[:, 0].cpu(), targets)
    top = ref.topk(num_top, dim=-1)
    assert torch.equal(t.token_ids[:, 1:].cpu(), top.indices)
    assert torch.allclose(t.logprobs.cpu().double(), ref.gather(-1, t.token_ids.cpu()), atol=1e-5)
    assert torch.equal(t.ranks.cpu(), _reference_ranks(ref, targets))


def test_ranks_by_sorting() -> None:
    logprobs = torch.tensor([[-0.1, -3.0, -1.0, -2.0]], device=DEVICE)
    for target, rank in [(0, 1), (2, 2), (3, 3), (1, 4)]:
        t = gather_logprobs(logprobs, 2, torch.tensor([target], device=DEVICE))
        assert t.ranks.tolist() == [rank]


def test_tied_tokens_share_best_rank() -> None:
    logprobs = torch.tensor([[-1.0, -0.5, -0.5, -2.0]], device=DEVICE)
    t = gather_logprobs(logprobs, 0, torch.tensor([2], device=DEVICE))
    assert t.ranks.tolist() == [1]
    t = gather_logprobs(logprobs, 0, torch.tensor([0], device=DEVICE))
    assert t.ranks.tolist() == [3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1024, 3])
def test_prompt_logprobs(dtype: torch.dtype, chunk_size: int) -> None:
    logits = _random(10, 30, seed=2).to(dtype)
    targets = torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(3))
    t = compute_prompt_logprobs(logits.to(DEVICE), targets.to(DEVICE), 4, chunk_size=chunk_size)
    ref = logits.double().log_softmax(-1)  # the float32 upcast of bf16 values is exact
    assert t.token_ids.shape == (10, 5) and t.logprobs.dtype == torch.float32
    assert torch.equal(t.token_ids[:, 0].cpu(), targets)
    assert torch.allclose(t.logprobs.cpu().double(), ref.gather(-1, t.token_ids.cpu()), atol=1e-5)
    assert torch.equal(t.ranks.cpu(), _reference_ranks(ref, targets))


def test_prompt_logprobs_empty() -> None:
    t = compute_prompt_logprobs(torch.zeros(0, 30, device=DEVICE),
                                torch.zeros(0, dtype=torch.int64, device=DEVICE), 2)
    assert t.token_ids.shape == (0, 3) and t.ranks.shape == (0,)


def _tensors() -> LogprobsTensors:
    return LogprobsTensors(
        token_ids=torch.tensor([[5, 5, 2, 9], [7, 1, 2, 3], [4, 8, 4, 0]], device=DEVICE),
        logprobs=torch.tensor([[-0.5, -0.5, -1.0, -2.0],
                               [-4.0, -0.25, -1.5, -2.0],
                               [-1.0, -0.75, -1.0, -3.0]], device=DEVICE),
        ranks=torch.tensor([1, 9, 2], device=DEVICE),
    )


def test_to_position_logprobs_trims_each_row() -> None:
    rows = to_position_logprobs(_tensors(), [3, 1, 0], decode=lambda t: f"<{t}>")
    # Sampled token inside the top-K appears once, with its own rank.
    assert rows[0] == {5: Logprob(-0.5, 1, "<5>"), 2: Logprob(-1.0, 2, "<2>"),
                       9: Logprob(-2.0, 3, "<9>")}
    assert list(rows[0]) == [5, 2, 9]
    # Sampled token outside the top-K: K + 1 entries, sampled first.
    assert rows[1] == {7: Logprob(-4.0, 9, "<7>"), 1: Logprob(-0.25, 1, "<1>")}
    assert list(rows[1]) == [7, 1]
    # K = 0: only the sampled token.
    assert rows[2] == {4: Logprob(-1.0, 2, "<4>")}


def test_to_position_logprobs_without_decode() -> None:
    rows = to_position_logprobs(_tensors(), [2, 2, 3], decode=None)
    assert rows[2] == {4: Logprob(-1.0, 2, None), 8: Logprob(-0.75, 1, None),
                       0: Logprob(-3.0, 3, None)}
    assert all(lp.decoded_token is None for row in rows for lp in row.values())


def test_to_position_logprobs_checks_row_count() -> None:
    with pytest.raises(ValueError):
        to_position_logprobs(_tensors(), [1, 1], decode=None)
