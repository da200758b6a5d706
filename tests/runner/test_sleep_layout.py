"""The host copy's chunking: every tensor lies whole inside one chunk, chunks are cut on
tensor boundaries at about HOST_CHUNK bytes, and views round-trip the tensors' contents."""

from __future__ import annotations

import torch

from pagoda.runner import sleep
from pagoda.runner.sleep import _HostCopy, _Layout


def test_chunks_cover_every_tensor_whole(monkeypatch):
    monkeypatch.setattr(sleep, "HOST_CHUNK", 4096)
    tensors = [torch.randn(n) for n in (10, 900, 2000, 5, 3000, 1, 700)]  # float32
    layout = _Layout.of(tensors)
    copy = _HostCopy(layout)
    sizes = [b - a for a, b in zip(copy.starts, [*copy.starts[1:], layout.nbytes])]
    assert copy.starts[0] == 0 and sum(sizes) == layout.nbytes
    assert all(size >= 4096 for size in sizes[:-1])
    for i, t in enumerate(tensors):
        chunk, offset = copy.where[i]
        assert copy.starts[chunk] + offset == layout.offsets[i]
        assert offset + t.numel() * 4 <= sizes[chunk]
    copy.chunks = [torch.zeros(size, dtype=torch.uint8) for size in sizes]  # unpinned stand-in
    for i, t in enumerate(tensors):
        copy.view(i, t).copy_(t)
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    copy.copy_to(flat)
    for t, offset in zip(tensors, layout.offsets):
        assert torch.equal(sleep._view(flat, offset, t), t)
