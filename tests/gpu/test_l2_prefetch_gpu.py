"""The L2 prefetch ahead of a product on CUDA (`pagoda.layers.l2_prefetch`, Hopper and
later): its launch over tensors of any size leaves them as they were, eager and in a graph,
and models decode the same greedy tokens with it as without, launching it at both points."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers import l2_prefetch
from pagoda.layers.triton_support import cuda_capability
from tests.gpu.test_quantized_checkpoints_gpu import greedy
from tests.models.parity import random_prompts
from tests.models.test_quantized_checkpoints import CONFIG, write_quantized
from tests.utils import save_random_checkpoint

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_capability(torch.cuda.current_device()) < (9, 0),
    reason="bulk prefetches need compute capability 9.0")


def _tensors() -> list[torch.Tensor]:
    """Tensors of sizes past, at and below a chunk, a program's chunks, and 16 bytes."""
    chunk, program = l2_prefetch.CHUNK_BYTES, l2_prefetch.CHUNK_BYTES * l2_prefetch.LANES
    return [torch.randint(0, 255, (3 * program + 48,), device="cuda", dtype=torch.uint8),
            torch.randn(chunk // 2 + 8, device="cuda", dtype=torch.bfloat16),
            torch.randint(-9, 9, (5, 7), device="cuda", dtype=torch.int32),
            torch.randn(4, device="cuda")]


@pytest.mark.parametrize("count", [1, 2, 4])
def test_a_launch_leaves_its_tensors_as_they_were(count):
    tensors = _tensors()[:count]
    before = [t.clone() for t in tensors]
    l2_prefetch.launch(tensors)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        l2_prefetch.launch(tensors)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


@pytest.mark.parametrize("quantization", ["awq", None])
def test_a_model_decodes_the_same_tokens_with_its_weights_asked_of_l2(quantization, tmp_path,
                                                                       monkeypatch):
    source = save_random_checkpoint(CONFIG, tmp_path / "fp32", None)
    path = source
    if quantization:
        write_quantized(source, tmp_path / quantization, tmp_path / "reference", quantization)
        path = tmp_path / quantization
    prompts = random_prompts(CONFIG.vocab_size, (7, 19, 40))
    launched = []
    real = l2_prefetch.launch
    monkeypatch.setattr(l2_prefetch, "launch",
                        lambda tensors: (launched.append(len(tensors)), real(tensors)))
    monkeypatch.setenv("PAGODA_L2_PREFETCH", "1")
    l2_prefetch._points.cache_clear()
    try:
        asked = greedy(path, prompts, dtype="bfloat16")
        assert launched
        monkeypatch.setenv("PAGODA_L2_PREFETCH", "0")
        l2_prefetch._points.cache_clear()
        count = len(launched)
        plain = greedy(path, prompts, dtype="bfloat16")
        assert len(launched) == count
    finally:
        l2_prefetch._points.cache_clear()
    assert asked == plain
