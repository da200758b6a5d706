"""The logits bitmask: applying it equals xgrammar's own kernel."""

from __future__ import annotations

import torch

from pagoda.structured_output.bitmask import apply_bitmask, new_bitmask


def test_apply_bitmask_matches_xgrammar():
    import xgrammar as xgr
    gen = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, -(-vocab // 32)), dtype=torch.int32,
                            generator=gen)
    logits = torch.randn(5, vocab, generator=gen)
    ours, theirs = logits.clone(), logits.clone()
    rows = [0, 2, 4]
    apply_bitmask(ours, bitmask, rows)
    full = new_bitmask(5, vocab)
    full[rows] = bitmask
    xgr.apply_token_bitmask_inplace(theirs, full)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[[1, 3]], logits[[1, 3]])  # unconstrained rows untouched
