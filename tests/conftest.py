"""Shared fixtures: the pulled SmolLM2 model, small random checkpoints, a shared LLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda.models import store


def pytest_report_header(config):
    return f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    path = store.find_pulled("smollm2")
    if path is None:
        pytest.fail("SmolLM2 is not pulled: run `pagoda pull smollm2` (make test does it)")
    return path


@pytest.fixture(scope="session")
def gemma3_270m_dir() -> Path:
    path = store.find_pulled("gemma3-270m")
    if path is None:
        pytest.fail("Gemma 3 270M is not pulled: run `pagoda pull gemma3-270m` (make test does it)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir: Path) -> Path:
    return next(smollm2_dir.glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path, tmp_path_factory):
    """transformers' own float32 load of the same GGUF: the oracle for config, names, layout
    and values (read from a copy without the tokenizer's arrays: tests/models/parity.py)."""
    from tests.models.parity import hf_gguf_model
    return hf_gguf_model(smollm2_gguf, tmp_path_factory.mktemp("smollm2-hf"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_dir: Path):
    """One engine shared by read-only tests (each test must leave it idle); its weights are
    dequantized to float32 at load, as transformers reads the GGUF it is compared with."""
    from pagoda import LLM
    llm = LLM(str(smollm2_dir), kv_cache_memory=256 << 20, max_model_len=2048,
              max_num_seqs=32, max_num_batched_tokens=1024, quantization="none")
    yield llm
    assert not llm.engine.has_unfinished_requests()
