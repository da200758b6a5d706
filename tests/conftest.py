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


def _use_cpu_kernel(kernel: str, monkeypatch) -> None:
    from pagoda.layers.quantization import cpu_block_dot
    if kernel == "torch":
        monkeypatch.setenv("PAGODA_CPU_BLOCK_DOT", "0")
    cpu_block_dot._library.cache_clear()
    if kernel == "cpu_block_dot" and not cpu_block_dot.available():
        pytest.skip("the CPU block-dot kernel does not run here (no g++ or no AVX-512 VNNI)")


@pytest.fixture(params=["cpu_block_dot", "torch"])
def cpu_kernel(request, monkeypatch):
    """Each CPU path for quantized weights in turn: pagoda's block-dot kernel (skipped where
    it does not run) and torch's kernels or decoding at load (PAGODA_CPU_BLOCK_DOT=0)."""
    from pagoda.layers.quantization import cpu_block_dot
    _use_cpu_kernel(request.param, monkeypatch)
    yield request.param
    cpu_block_dot._library.cache_clear()  # (before the variable is restored)


@pytest.fixture(params=["cpu_fp8_dot", "decoded"])
def fp8_cpu_kernel(request, monkeypatch):
    """Each CPU path for float8 weights in turn: pagoda's float8 kernel (skipped where it
    does not run) and the weights decoded at load (PAGODA_CPU_FP8_DOT=0)."""
    from pagoda.layers.quantization import cpu_fp8_dot
    if request.param == "decoded":
        monkeypatch.setenv(cpu_fp8_dot.VARIABLE, "0")
    cpu_fp8_dot._library.cache_clear()
    if request.param == "cpu_fp8_dot" and not cpu_fp8_dot.available():
        pytest.skip("the CPU float8 kernel does not run here (no g++, or neither AVX-512 "
                    "nor AVX2)")
    yield request.param
    cpu_fp8_dot._library.cache_clear()  # (before the variable is restored)


@pytest.fixture
def torch_cpu_kernels(monkeypatch):
    """Quantized CPU layers on torch's kernels, not pagoda's block-dot kernel."""
    from pagoda.layers.quantization import cpu_block_dot
    _use_cpu_kernel("torch", monkeypatch)
    yield
    cpu_block_dot._library.cache_clear()


@pytest.fixture
def block_dot_kernel(monkeypatch):
    """Quantized CPU layers on pagoda's block-dot kernel (skipped where it does not run)."""
    _use_cpu_kernel("cpu_block_dot", monkeypatch)
