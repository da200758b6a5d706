"""Quantized weights on CUDA: an FP8 block checkpoint on two ranks over NCCL gives one GPU's
tokens (each rank's slice of the float8 weights and block scales, decoded per call), and an
untied GGUF's Q8_0 embedding kept in blocks on the GPU gives the dequantized table's."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.models.parity import random_prompts
from tests.models.test_gguf_quantized import UNTIED, write_untied_gguf
from tests.models.test_quantized_checkpoints import CONFIG, write_fp8
from tests.utils import save_random_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def greedy(path, prompts, **options) -> list[list[int]]:
    llm = LLM(str(path), device="cuda", dtype="float32", kv_cache_memory=256 << 20,
              max_model_len=256, **options)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
        return [o.outputs[0].token_ids for o in outputs]
    finally:
        llm.engine.core.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fp8_blocks_on_two_ranks_give_one_gpus_tokens(tmp_path):
    source = save_random_checkpoint(CONFIG, tmp_path / "fp32", None)
    write_fp8(source, tmp_path / "fp8", tmp_path / "reference")
    prompts = random_prompts(CONFIG.vocab_size, (7, 19, 40))
    assert greedy(tmp_path / "fp8", prompts, tensor_parallel_size=2) == \
        greedy(tmp_path / "fp8", prompts)


def test_an_untied_q8_0_table_decoded_per_lookup_on_the_gpu(tmp_path):
    path = write_untied_gguf(tmp_path / "untied.gguf")
    prompts = random_prompts(UNTIED.vocab_size, (5, 17))
    assert greedy(path, prompts, quantization="gguf") == \
        greedy(path, prompts, quantization="none")
