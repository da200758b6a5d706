"""Grammar-constrained sampling on CUDA, with CUDA graphs, mixed with free requests."""

from __future__ import annotations

import json
import re

import pytest

from pagoda import LLM, SamplingParams
from pagoda.bench.word_tokenizer import with_word_tokenizer
from pagoda.structured_output.params import StructuredOutputsParams as Spec


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    (root / "cfg").mkdir()
    (root / "cfg" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 1024,
        "bos_token_id": 1, "eos_token_id": 2}))
    model = with_word_tokenizer(root / "cfg", root / "model")
    return LLM(str(model), load_format="dummy", device="cuda", dtype="bfloat16",
               kv_cache_memory=256 << 20, max_num_seqs=16)


def test_constraints_hold_on_cuda_in_mixed_batches(llm):
    assert llm.engine.core.executor.worker.runner.graphs is not None
    choices = ["w5", "w77", "w123"]
    params = []
    for i in range(12):
        if i % 3 == 0:
            params.append(SamplingParams(max_tokens=8, temperature=1.0, seed=i,
                                         structured_outputs=Spec(choice=choices)))
        elif i % 3 == 1:
            params.append(SamplingParams(max_tokens=8, temperature=1.0, seed=i,
                                         structured_outputs=Spec(regex="(w[0-9]+){3}")))
        else:
            params.append(SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    outs = llm.generate(["w3 w4 w9"] * 12, params)
    for i, out in enumerate(outs):
        text, finish = out.outputs[0].text.strip(), out.outputs[0].finish_reason
        if i % 3 == 0:
            assert text in choices and finish == "stop"
        elif i % 3 == 1:
            assert re.fullmatch(r"w\d+ w\d+ w\d+", text) and finish == "stop"
        else:
            assert len(out.outputs[0].token_ids) == 16
