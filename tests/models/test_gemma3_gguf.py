"""The real Gemma 3 270M (Q4_K_M GGUF, pulled by `make model`) in pagoda against transformers
loading the same file: greedy tokens and prompt logprobs (tolerance in tests/models/parity.py),
on a short prompt, a chat and a prompt longer than the local layers' 512-token window."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda import LLM
from tests.models.parity import check_parity, hf_gguf_model

PROMPTS = ["The capital of France is"]
CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"}]
# about 630 tokens: the sliding-window layers (512) no longer see the beginning
LONG_PROMPT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(48))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3_hf(gemma3_270m_dir: Path, tmp_path_factory):
    return hf_gguf_model(next(gemma3_270m_dir.glob("*.gguf")), tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def gemma3_llm(gemma3_270m_dir: Path) -> LLM:
    return LLM(str(gemma3_270m_dir), dtype="float32", kv_cache_memory=96 << 20,
               max_model_len=1024, max_num_batched_tokens=1024,
               quantization="none")  # decoded at load, as transformers reads the GGUF


def test_greedy_tokens_and_prompt_logprobs_match_transformers(gemma3_llm, gemma3_hf):
    """One batch: a short prompt, a chat in pagoda's Gemma template, and a prompt whose local
    layers see only its last 512 positions (the global ones see all)."""
    tokenizer = gemma3_llm.get_tokenizer()
    chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    prompts = [tokenizer(p).input_ids for p in PROMPTS] + [list(chat)] + \
        [tokenizer(LONG_PROMPT).input_ids]
    assert all(ids[0] == tokenizer.bos_token_id for ids in prompts)
    window = gemma3_llm.engine.core.source.hf_config.sliding_window
    assert window == 512 < len(prompts[-1]) < 1024 - 32
    check_parity(gemma3_llm, gemma3_hf, prompts, num_tokens=16)
