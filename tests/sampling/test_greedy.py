"""The chunked greedy argmax equals torch's argmax: random rows of vocabularies that do and do
not fill their last chunk, ties inside and across chunks (the first index wins), rows of
-inf, NaN counted as +inf, each logits type. Run under Triton's CPU interpreter here (a
subprocess: TRITON_INTERPRET=1 must be set before triton is imported), on the GPU in
tests/gpu/test_greedy_gpu.py."""

from __future__ import annotations

import json

import torch

from tests.utils import interpreter_report

MARKER = "GREEDY_MISMATCHES "


def cases(device: str) -> dict[str, torch.Tensor]:
    """Named logits [rows, vocab] in float32; the callers cast them."""
    generator = torch.Generator().manual_seed(0)
    chunk = 4096
    named = {f"random-{vocab}": torch.randn(3, vocab, generator=generator)
             for vocab in (1, 7, chunk, chunk + 1, 3 * chunk - 5)}
    ties = torch.zeros(4, 2 * chunk + 9)
    ties[0] = 1.0  # all equal: index 0
    ties[1, [chunk + 3, 5, 2 * chunk + 1]] = 2.0  # across chunks: the first, 5
    ties[2, [chunk + 3, chunk + 7]] = 2.0  # inside a chunk after the first
    ties[3] = float("-inf")  # nothing finite: index 0
    named["ties"] = ties
    nan = torch.randn(2, chunk + 20, generator=generator)
    nan[0, chunk + 2] = float("nan")
    nan[1, 9], nan[1, 4] = float("nan"), float("inf")  # NaN as +inf: the first of them, 4
    named["nan"] = nan
    return {name: logits.to(device) for name, logits in named.items()}


def expected(logits: torch.Tensor) -> torch.Tensor:
    """torch's argmax with NaN read as +inf (torch itself prefers NaN over +inf)."""
    inf = float("inf")
    return torch.nan_to_num(logits.float(), nan=inf, posinf=inf, neginf=-inf).argmax(-1)


def mismatches(device: str) -> dict[str, list[int]]:
    """Per case and logits type, the rows whose index differs from the expected one."""
    from pagoda.sampling.greedy import chunked_argmax
    found = {}
    for name, logits in cases(device).items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            typed = logits.to(dtype)
            got = chunked_argmax(typed)
            assert got.dtype == torch.int64 and got.shape == (typed.shape[0],)
            found[f"{name}/{dtype}"] = (got != expected(typed)).nonzero().flatten().tolist()
    return found


def test_the_kernels_match_torch_under_the_interpreter():
    found = interpreter_report("tests.sampling.test_greedy", MARKER)
    assert len(found) == 7 * 3
    assert all(rows == [] for rows in found.values()), found


def test_the_expected_indices_of_the_hand_made_rows():
    named = cases("cpu")
    assert expected(named["ties"]).tolist() == [0, 5, 4096 + 3, 0]
    assert expected(named["nan"]).tolist() == [4096 + 2, 4]


def test_the_cpu_and_odd_tensors_take_torchs_argmax():
    from pagoda.sampling.greedy import greedy_tokens, takes
    logits = torch.randn(3, 50)
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert takes(logits) and not takes(logits.t()) and not takes(torch.zeros(0, 5))
    assert not takes(logits.to(torch.float64))


if __name__ == "__main__":
    print(MARKER + json.dumps(mismatches("cpu")))
