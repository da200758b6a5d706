"""LoRA serving benchmark: the same offline workload on the base model and spread over 1, 4,
16 ... random adapters (rank r on all seven projections), plus decode-1 (one request alone)
with and without an adapter. Ratios are to the base run of an engine without LoRA.

    python -m pagoda.bench.lora --model bench/configs/llama-3.1-8b --load-format dummy \\
        --num-prompts 1000 --input-len 1024 --output-len 512 --adapters 1 4 16 \\
        --max-loras 16 --rank 16 --output-json bench/results/lora-8b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pagoda.bench.throughput import (
    ThroughputConfig,
    environment,
    git_info,
    make_requests,
    sampling_params,
)
from pagoda.models.arch.base import head_dim

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of a Llama-like layer."""
    hidden, inter, hd = config.hidden_size, config.intermediate_size, head_dim(config)
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    return {"q_proj": (hidden, heads * hd), "k_proj": (hidden, kv_heads * hd),
            "v_proj": (hidden, kv_heads * hd), "o_proj": (heads * hd, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def write_random_adapter(config: Any, path: Path, rank: int, seed: int,
                         targets: tuple[str, ...] = ALL_SEVEN) -> Path:
    """A PEFT-format LoRA of `rank` on `targets` of every layer, small random weights."""
    gen = torch.Generator().manual_seed(seed)
    shapes, tensors = module_shapes(config), {}
    for layer in range(config.num_hidden_layers):
        for module in targets:
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            stem = f"base_model.model.model.layers.{layer}.{group}.{module}"
            fan_in, fan_out = shapes[module]
            tensors[f"{stem}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen)
                                                / fan_in ** 0.5).to(torch.bfloat16)
            tensors[f"{stem}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen)
                                                * 0.01).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
         "bias": "none"}))
    return path


def timed_generate(llm: Any, requests: list, cfg: ThroughputConfig,
                   loras: list[str | None] | None) -> dict[str, float]:
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [sampling_params(cfg, r, i) for i, r in enumerate(requests)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora=loras) if loras else llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt = sum(len(r.prompt_token_ids) for r in requests)
    return {"elapsed_s": elapsed, "output_tokens_per_s": generated / elapsed,
            "total_tokens_per_s": (generated + prompt) / elapsed}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pagoda.engine.llm import LLM
    cfg = ThroughputConfig(model=args.model, num_prompts=args.num_prompts,
                           input_len=args.input_len, output_len=args.output_len)
    engine = {"load_format": args.load_format, "max_num_seqs": args.max_num_seqs,
              "max_model_len": args.input_len + args.output_len + 16}
    result: dict[str, Any] = {"environment": environment(), "git": git_info(),
                              "config": vars(args), "runs": {}}
    plain = LLM(args.model, **engine)
    requests = make_requests(cfg, plain.engine.model_info.vocab_size, plain.get_tokenizer())
    timed_generate(plain, requests[:4], cfg, None)  # warm-up
    result["runs"]["base_without_lora"] = timed_generate(plain, requests, cfg, None)
    result["runs"]["decode1_base"] = timed_generate(plain, requests[:1], cfg, None)
    hf_config = plain.engine.core.source.hf_config
    del plain
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm = LLM(args.model, **engine, enable_lora=True, max_loras=args.max_loras,
              max_lora_rank=args.rank, max_cpu_loras=max(args.max_loras, max(args.adapters)))
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i in range(max(args.adapters)):
            names.append(f"adapter-{i}")
            llm.add_lora(names[-1], str(write_random_adapter(hf_config, Path(tmp) / names[-1],
                                                             args.rank, seed=i)))
        timed_generate(llm, requests[:4], cfg, names[:4] if len(names) >= 4 else None)
        result["runs"]["base_on_lora_engine"] = timed_generate(llm, requests, cfg, None)
        for n in args.adapters:
            loras = [names[i % n] for i in range(len(requests))]
            result["runs"][f"adapters_{n}"] = timed_generate(llm, requests, cfg, loras)
        result["runs"]["decode1_adapter"] = timed_generate(llm, requests[:1], cfg, names[:1])
    base = result["runs"]["base_without_lora"]["output_tokens_per_s"]
    result["ratios_to_base"] = {k: v["output_tokens_per_s"] / base
                                for k, v in result["runs"].items() if not k.startswith("decode1")}
    result["decode1_ratio"] = (result["runs"]["decode1_adapter"]["output_tokens_per_s"]
                               / result["runs"]["decode1_base"]["output_tokens_per_s"])
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pagoda.bench.lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/configs/llama-3.1-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-loras", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps({"ratios_to_base": result["ratios_to_base"],
                      "decode1_ratio": result["decode1_ratio"]}, indent=2))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
