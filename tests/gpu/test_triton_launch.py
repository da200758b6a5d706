"""Compiling ahead builds every Triton kernel variant the engine's startup launches."""

from __future__ import annotations

import pytest
import triton
from transformers import LlamaConfig

from pagoda import LLM
from pagoda.runner.model_runner import ModelRunner
from tests.utils import save_random_checkpoint


@pytest.fixture
def compile_events(monkeypatch):
    """Kernel compiles (their reprs) in order, between "ahead start" and "ahead done" marks
    around ModelRunner.compile_kernels_ahead."""
    events: list[str] = []
    ahead = ModelRunner.compile_kernels_ahead

    def marked(self, *args, **kwargs):
        events.append("ahead start")
        ahead(self, *args, **kwargs)
        events.append("ahead done")

    monkeypatch.setattr(ModelRunner, "compile_kernels_ahead", marked)
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook",
                        lambda **info: events.append(info["repr"]))
    return events


def test_startup_compiles_nothing_after_compiling_ahead(tmp_path, compile_events):
    # a shape no other test uses: its kernel variants are new to this process
    config = LlamaConfig(hidden_size=320, intermediate_size=640, num_hidden_layers=2,
                         num_attention_heads=5, num_key_value_heads=1, head_dim=64,
                         vocab_size=1000, max_position_embeddings=2048)
    checkpoint = str(save_random_checkpoint(config, tmp_path, None))
    LLM(checkpoint, device="cuda", dtype="bfloat16", kv_cache_memory=1 << 28, max_num_seqs=24,
        max_num_batched_tokens=1536)
    start, done = compile_events.index("ahead start"), compile_events.index("ahead done")
    assert compile_events[start + 1:done], "nothing was compiled ahead"
    assert compile_events[done + 1:] == []  # the memory profile and graph capture compiled none
