"""pagoda against transformers on the same weights: greedy tokens and per-token logprobs,
for one prompt alone, several batched, on prefix-cache hits and in tiny prefill chunks.

Tolerance: float32 on both sides; per-token logprobs agree within 2e-3 (the two
implementations order their float32 reductions differently; observed differences are ~1e-5).
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pagoda import LLM, SamplingParams
from pagoda.models.loader.gguf import GGUF_ARRAY, GGUF_SCALAR_SIZES, GGUF_STRING
from tests.utils import save_random_checkpoint

LOGPROB_TOL = 2e-3


def hf_greedy(model, ids: list[int], n: int, ignore_eos: bool = True) -> list[int]:
    # an explicit mask: generate() would otherwise mask every prompt token equal to the pad id
    out = model.generate(torch.tensor([ids]),
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n,
                         min_new_tokens=n if ignore_eos else 0, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def check_parity(llm: LLM, hf_model, prompts: list[list[int]], num_tokens: int,
                 prompt_logprobs: bool = True) -> None:
    """Greedy tokens equal transformers', and prompt logprobs (requests that ask for them
    skip the prefix cache) agree within LOGPROB_TOL."""
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True,
                            prompt_logprobs=0 if prompt_logprobs else None)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for ids, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, ids, num_tokens)
        if not prompt_logprobs:
            continue
        ours = torch.tensor([pos[ids[i + 1]].logprob
                             for i, pos in enumerate(out.prompt_logprobs[1:])])
        theirs = hf_prompt_logprobs(hf_model, ids)
        assert (ours - theirs).abs().max().item() < LOGPROB_TOL


def random_prompts(vocab_size: int, lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def check_random_checkpoint(config, path: Path, num_tokens: int = 32,
                            original_format: bool = True) -> None:
    """A random checkpoint of `config` served by pagoda matches transformers: alone, batched,
    with prefix-cache hits (the same prompts again, and a shared prefix), and with prefill
    split into 8-token chunks. `original_format` False: saved as transformers 5 holds the
    tensors (packed experts)."""
    path = save_random_checkpoint(config, path, None, original_format=original_format)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts(config.vocab_size, (5, 37, 90))
    shared = prompts[2][:64] + random_prompts(config.vocab_size, (9,), seed=2)[0]
    llm = LLM(str(path), kv_cache_memory=32 << 20, max_num_batched_tokens=64)
    check_parity(llm, hf_model, prompts[1:2], num_tokens, prompt_logprobs=False)  # alone
    check_parity(llm, hf_model, prompts, num_tokens)  # batched
    hits = llm.engine.core.kv_manager.stats.hits
    check_parity(llm, hf_model, [prompts[1], shared], num_tokens, prompt_logprobs=False)
    assert llm.engine.core.kv_manager.stats.hits - hits >= 32 + 64  # both hit the cache
    chunked = LLM(str(path), kv_cache_memory=32 << 20, max_num_batched_tokens=8,
                  max_num_seqs=4, enable_prefix_caching=False)
    check_parity(chunked, hf_model, prompts, num_tokens)


# ------------------------------------------------------------------ transformers' GGUF, faster
# transformers reads a GGUF's metadata with gguf-py, one memory-mapped slice per array element:
# tens of seconds for a 49k- or 262k-token vocabulary, read twice (config, then weights). The
# model needs none of the tokenizer's arrays, so the reference loads a copy without them: the
# same tensors, byte for byte, and every other key (the tokenizer's scalar ids included), plus
# `<arch>.vocab_size` where transformers would have counted the vocabulary's tokens instead.


def hf_gguf_model(gguf_file: Path, work_dir: Path):
    """transformers' float32 model of `gguf_file` (read from a copy without the tokenizer's
    arrays, made in `work_dir`)."""
    slim = gguf_without_tokenizer_arrays(gguf_file, work_dir / gguf_file.name)
    return AutoModelForCausalLM.from_pretrained(work_dir, gguf_file=slim.name,
                                                dtype=torch.float32).eval()


def gguf_without_tokenizer_arrays(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    magic, version, num_tensors, num_keys = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF" and version >= 2, (magic, version)
    pos, kept, values, alignment = 24, [], {}, 32
    for _ in range(num_keys):
        start = pos
        key, pos = _gguf_string(data, pos)
        (kind,), pos = struct.unpack_from("<I", data, pos), pos + 4
        values[key] = (kind, pos)
        pos = _skip_gguf_value(data, pos, kind)
        if not (key.startswith("tokenizer.") and kind == GGUF_ARRAY):
            kept.append(data[start:pos])
    if "general.alignment" in values:
        alignment = struct.unpack_from("<I", data, values["general.alignment"][1])[0]
    arch = _gguf_string(data, values["general.architecture"][1])[0]
    if f"{arch}.vocab_size" not in values and "tokenizer.ggml.tokens" in values:
        (num_tokens,) = struct.unpack_from("<Q", data, values["tokenizer.ggml.tokens"][1] + 4)
        key = f"{arch}.vocab_size".encode()
        kept.append(struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, num_tokens))
    infos_start = pos
    for _ in range(num_tensors):
        _, pos = _gguf_string(data, pos)
        (dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * dims + 4 + 8  # the dims, the type, the offset into the data
    data_start = -(-pos // alignment) * alignment
    head = struct.pack("<4sIQQ", magic, version, num_tensors, len(kept)) + b"".join(kept) \
        + data[infos_start:pos]
    head += b"\0" * (-len(head) % alignment)
    with dst.open("wb") as out:
        out.write(head)
        out.write(memoryview(data)[data_start:])
    return dst


def _gguf_string(data: bytes, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, pos)
    return data[pos + 8:pos + 8 + length].decode("utf-8", "replace"), pos + 8 + length


def _skip_gguf_value(data: bytes, pos: int, kind: int) -> int:
    if kind == GGUF_STRING:
        return _gguf_string(data, pos)[1]
    if kind == GGUF_ARRAY:
        element, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if element in GGUF_SCALAR_SIZES:
            return pos + count * GGUF_SCALAR_SIZES[element]
        for _ in range(count):
            pos = _skip_gguf_value(data, pos, element)
        return pos
    return pos + GGUF_SCALAR_SIZES[kind]
