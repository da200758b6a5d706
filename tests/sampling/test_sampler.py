"""Tests of the sampler: greedy, support restriction, temperature, penalties, bias, seeds."""

from __future__ import annotations

import math
import os

import pytest
import torch

from pagoda.sampling.metadata import SamplingMetadata, SamplingRow, make_generator
from pagoda.sampling.sampler import Sampler, process_logits, warp_logits
from pagoda.sampling_params import SamplingParams

DEVICE = torch.device(os.environ.get("PAGODA_TEST_DEVICE", "cpu"))
PROBS = [0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.03, 0.02]
NEG_INF = float("-inf")


def _rows(params: list[SamplingParams], outputs: list[list[int]] | None = None,
          prompts: list[list[int]] | None = None, eos: int | None = None) -> list[SamplingRow]:
    return [
        SamplingRow(
            params=p,
            prompt_token_ids=prompts[i] if prompts else [],
            output_token_ids=outputs[i] if outputs else [],
            generator=make_generator(p.seed, DEVICE) if p.seed is not None else None,
            eos_token_id=eos,
        )
        for i, p in enumerate(params)
    ]


def _meta(rows: list[SamplingRow], vocab: int) -> SamplingMetadata:
    return SamplingMetadata.build(rows, vocab, DEVICE)


def _logits_from_probs(probs: list[float], n: int) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log().repeat(n, 1).to(DEVICE)


def _support(params: SamplingParams, probs: list[float] = PROBS, n: int = 4000) -> set[int]:
    """The set of tokens sampled from `probs` in n draws with the default RNG fixed."""
    torch.manual_seed(0)
    meta = _meta(_rows([params] * n), len(probs))
    return set(Sampler()(_logits_from_probs(probs, n), meta).sampled_token_ids.tolist())


def _frequencies(params: SamplingParams, probs: list[float], n: int = 20000) -> torch.Tensor:
    torch.manual_seed(0)
    meta = _meta(_rows([params] * n), len(probs))
    ids = Sampler()(_logits_from_probs(probs, n), meta).sampled_token_ids.cpu()
    return torch.bincount(ids, minlength=len(probs)).double() / n


# -- greedy ------------------------------------------------------------------------------------

def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    meta = _meta(_rows([SamplingParams(temperature=0.0)] * 6), 50)
    assert meta.all_greedy
    out = Sampler()(logits, meta)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None


def test_greedy_tie_takes_first_index() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]], device=DEVICE)
    meta = _meta(_rows([SamplingParams(temperature=0.0)]), 4)
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [1]


def test_mixed_batch_greedy_rows_stay_greedy() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=50)] * 2
    meta = _meta(_rows(params), 100)
    assert meta.greedy_mask is not None and not meta.all_greedy and not meta.all_random
    for _ in range(5):
        ids = Sampler()(logits, meta).sampled_token_ids
        assert torch.equal(ids[0::2], logits[0::2].argmax(-1))


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    before = logits.clone()
    params = [SamplingParams(temperature=0.7, top_p=0.5, min_p=0.1, top_k=5,
                             repetition_penalty=1.3, logit_bias={1: 3.0}, logprobs=2)] * 3
    Sampler()(logits, _meta(_rows(params, outputs=[[1, 2]] * 3), 20))
    assert torch.equal(logits, before)


# -- support restriction -----------------------------------------------------------------------

@pytest.mark.parametrize(("params", "expected"), [
    (SamplingParams(), set(range(8))),
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_k=1), {0}),
    (SamplingParams(top_k=8), set(range(8))),
    (SamplingParams(top_k=1000), set(range(8))),
    (SamplingParams(top_p=1.0), set(range(8))),
    (SamplingParams(top_p=0.6), {0, 1, 2}),  # 0.30 + 0.20 < 0.6 <= 0.65
    (SamplingParams(top_p=0.45), {0, 1}),
    (SamplingParams(top_p=0.1), {0}),
    (SamplingParams(min_p=0.3), {0, 1, 2, 3, 4}),  # keep p >= 0.09
    (SamplingParams(min_p=0.45), {0, 1, 2}),  # keep p >= 0.135
    (SamplingParams(min_p=1.0), {0}),
    # top_p sees the distribution renormalized after top_k: {.39 .26 .19 .16} -> 3 tokens.
    (SamplingParams(top_k=4, top_p=0.8), {0, 1, 2}),
    # ... and after min_p: {.46 .31 .23} -> 2 tokens.
    (SamplingParams(min_p=0.45, top_p=0.7), {0, 1}),
    # min_p acts on the tempered distribution: p^2 ratios .44 (kept) and .25 (dropped).
    (SamplingParams(temperature=0.5, min_p=0.4), {0, 1}),
], ids=repr)
def test_support(params: SamplingParams, expected: set[int]) -> None:
    assert _support(params) == expected


def test_top_k_keeps_ties_with_kth() -> None:
    assert _support(SamplingParams(top_k=1), [0.3, 0.3, 0.2, 0.2]) == {0, 1}
    assert _support(SamplingParams(top_k=3), [0.3, 0.3, 0.2, 0.2]) == {0, 1, 2, 3}


def test_top_p_keeps_ties_with_last_kept() -> None:
    assert _support(SamplingParams(top_p=0.5), [0.4, 0.3, 0.3]) == {0, 1, 2}
    assert _support(SamplingParams(top_p=0.35), [0.4, 0.3, 0.3]) == {0}


def test_top_p_one_keeps_tiny_tail() -> None:
    probs = [1.0 - 3e-9, 1e-9, 1e-9, 1e-9]
    logits = _logits_from_probs(probs, 2)
    meta = _meta(_rows([SamplingParams(top_p=1.0), SamplingParams(top_p=0.5)]), 4)
    warped = warp_logits(logits, meta)
    assert torch.isfinite(warped[0]).all()
    assert torch.isfinite(warped[1]).tolist() == [True, False, False, False]


def _reference_support(logits: list[float], p: SamplingParams) -> set[int]:
    """min_p -> top_k -> top_p on the tempered distribution, in float64 python."""
    x = [v / p.temperature for v in logits]
    top = max(x)
    keep = {i for i, v in enumerate(x) if math.exp(v - top) >= p.min_p}
    if p.top_k:
        kth = sorted((x[i] for i in keep), reverse=True)[min(p.top_k, len(keep)) - 1]
        keep = {i for i in keep if x[i] >= kth}
    total = sum(math.exp(x[i] - top) for i in keep)
    cumulative, cutoff = 0.0, top
    for i in sorted(keep, key=lambda i: -x[i]):
        cumulative, cutoff = cumulative + math.exp(x[i] - top) / total, x[i]
        if cumulative >= p.top_p:
            break
    return {i for i in keep if x[i] >= cutoff}


def test_warped_support_matches_reference_on_random_rows() -> None:
    gen = torch.Generator().manual_seed(4)
    n, vocab = 48, 64
    logits = torch.randn(n, vocab, generator=gen) * 2
    params = [SamplingParams(
        temperature=float(torch.empty(()).uniform_(0.3, 2.0, generator=gen)),
        min_p=[0.0, 0.05, 0.2][i % 3],
        top_k=[0, 1, 5, 20, 64][i % 5],
        top_p=[1.0, 0.9, 0.5, 0.2][i % 4],
    ) for i in range(n)]
    warped = warp_logits(logits.to(DEVICE), _meta(_rows(params), vocab)).cpu()
    for row in range(n):
        got = set(torch.isfinite(warped[row]).nonzero().flatten().tolist())
        assert got == _reference_support(logits[row].tolist(), params[row]), params[row]


# -- temperature -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_distribution(temperature: float) -> None:
    probs = [0.5, 0.3, 0.2]
    expected = torch.tensor(probs, dtype=torch.float64).log().div(temperature).softmax(-1)
    got = _frequencies(SamplingParams(temperature=temperature), probs)
    assert torch.allclose(got, expected, atol=0.015), (got, expected)


def test_temperature_divides_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]] * 2, device=DEVICE)
    meta = _meta(_rows([SamplingParams(temperature=0.5), SamplingParams(temperature=0.0)]), 3)
    warped = warp_logits(logits, meta)
    assert torch.allclose(warped[0], logits[0] / 0.5)
    assert torch.equal(warped[1], logits[1])  # greedy rows are left at temperature 1


# -- penalties, bias, min_tokens ---------------------------------------------------------------

BASE = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]
PROMPT = [0, 1]
OUTPUT = [2, 2, 4]


def _processed(params: SamplingParams, eos: int | None = None,
               output: list[int] = OUTPUT) -> list[list[float]]:
    """Processed logits of a penalized row and of a plain row batched with it."""
    logits = torch.tensor([BASE, BASE], device=DEVICE)
    rows = _rows([params, SamplingParams()], outputs=[output, output], prompts=[PROMPT, PROMPT],
                 eos=eos)
    out = process_logits(logits, _meta(rows, len(BASE))).cpu()
    assert out[1].tolist() == BASE  # the other row is untouched
    return out.tolist()


def test_repetition_penalty() -> None:
    # seen = prompt {0, 1} | output {2, 4}: positives divided, negatives multiplied.
    got = _processed(SamplingParams(repetition_penalty=2.0))[0]
    assert got == pytest.approx([1.0, -2.0, 0.25, 3.0, -4.0, 1.0])


def test_presence_penalty() -> None:
    got = _processed(SamplingParams(presence_penalty=0.5))[0]
    assert got == pytest.approx([2.0, -1.0, 0.0, 3.0, -2.5, 1.0])


def test_frequency_penalty() -> None:
    got = _processed(SamplingParams(frequency_penalty=0.25))[0]
    assert got == pytest.approx([2.0, -1.0, 0.0, 3.0, -2.25, 1.0])


def test_penalties_combined() -> None:
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = _processed(params)[0]
    assert got == pytest.approx([1.0, -2.0, 0.25 - 0.5 - 0.5, 3.0, -4.0 - 0.5 - 0.25, 1.0])


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([BASE], device=DEVICE)
    rows = _rows([SamplingParams(temperature=0.0, frequency_penalty=2.0)], outputs=[[3]])
    assert Sampler()(logits, _meta(rows, len(BASE))).sampled_token_ids.tolist() == [0]


def test_logit_bias() -> None:
    got = _processed(SamplingParams(logit_bias={4: 10.0, 0: -1.5, 99: 5.0}), output=[])[0]
    assert got == pytest.approx([0.5, -1.0, 0.5, 3.0, 8.0, 1.0])
    rows = _rows([SamplingParams(temperature=0.0, logit_bias={4: 10.0})])
    ids = Sampler()(torch.tensor([BASE], device=DEVICE), _meta(rows, len(BASE))).sampled_token_ids
    assert ids.tolist() == [4]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_blocks_eos_and_stop_ids(ignore_eos: bool) -> None:
    params = SamplingParams(min_tokens=4, stop_token_ids=[0], ignore_eos=ignore_eos)
    got = _processed(params, eos=3)[0]  # 3 outputs < 4
    assert got == [NEG_INF, -1.0, 0.5, NEG_INF, -2.0, 1.0]
    assert _processed(params, eos=3, output=OUTPUT + [5])[0] == BASE  # 4 outputs: free


def test_min_tokens_greedy_avoids_eos() -> None:
    rows = _rows([SamplingParams(temperature=0.0, min_tokens=1)], eos=3)
    ids = Sampler()(torch.tensor([BASE], device=DEVICE), _meta(rows, len(BASE))).sampled_token_ids
    assert ids.tolist() == [0]


# -- seeds -------------------------------------------------------------------------------------

SEEDED = SamplingParams(temperature=1.0, seed=1234)


def _seeded_run(others: list[SamplingParams], position: int, steps: int = 6) -> list[int]:
    """Tokens the seeded row draws over several steps, placed at `position` among `others`."""
    vocab = 1000
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 0.5
    params = others[:position] + [SEEDED] + others[position:]
    rows = _rows(params, outputs=[[7]] * len(params))
    torch.manual_seed(len(others) * 17 + position)  # unrelated default-RNG state
    drawn = []
    for _ in range(steps):
        logits = torch.randn(len(params), vocab)
        logits[position] = base
        ids = Sampler()(logits.to(DEVICE), _meta(rows, vocab)).sampled_token_ids
        drawn.append(int(ids[position]))
    return drawn


def test_seeded_row_is_reproducible_across_batches() -> None:
    alone = _seeded_run([], 0)
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=3, top_p=0.5, min_p=0.1),
              SamplingParams(seed=99, temperature=0.3), SamplingParams(logprobs=5),
              SamplingParams(repetition_penalty=1.5, presence_penalty=1.0)]
    assert len(set(alone)) > 1
    assert _seeded_run(others, 2) == alone
    assert _seeded_run(others, 5) == alone
    assert _seeded_run(others[:2], 1) == alone


def test_different_seeds_differ() -> None:
    vocab = 1000
    logits = torch.zeros(2, vocab, device=DEVICE)
    rows = _rows([SamplingParams(seed=1), SamplingParams(seed=2)])
    draws = [Sampler()(logits, _meta(rows, vocab)).sampled_token_ids.tolist() for _ in range(4)]
    assert [a for a, _ in draws] != [b for _, b in draws]


def test_unseeded_rows_differ_across_calls() -> None:
    vocab = 1000
    logits = torch.zeros(8, vocab, device=DEVICE)
    meta = _meta(_rows([SamplingParams()] * 8), vocab)
    first = Sampler()(logits, meta).sampled_token_ids
    second = Sampler()(logits, meta).sampled_token_ids
    assert not torch.equal(first, second)


# -- logprobs ----------------------------------------------------------------------------------

def test_sampled_logprobs_are_raw() -> None:
    vocab = 40
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(6))
    params = [SamplingParams(logprobs=3, temperature=0.0, logit_bias={7: 50.0}),
              SamplingParams(), SamplingParams(logprobs=1, top_k=2)]
    out = Sampler()(logits.to(DEVICE), _meta(_rows(params), vocab))
    assert out.logprobs is not None
    lp = out.logprobs
    assert lp.token_ids.shape == (3, 4) and lp.logprobs.shape == (3, 4) and lp.ranks.shape == (3,)
    ref = logits.double().log_softmax(-1)
    sampled = out.sampled_token_ids.cpu()
    assert sampled[0] == 7  # biased, but logprobs are of the unprocessed logits
    assert torch.equal(lp.token_ids[:, 0].cpu(), sampled)
    expected = ref.gather(-1, lp.token_ids.cpu())
    assert torch.allclose(lp.logprobs.cpu().double(), expected, atol=1e-5)
    assert torch.equal(lp.token_ids[:, 1:].cpu(), ref.topk(3, dim=-1).indices)
    expected_ranks = (ref > ref.gather(-1, sampled[:, None])).sum(-1) + 1
    assert torch.equal(lp.ranks.cpu(), expected_ranks)
