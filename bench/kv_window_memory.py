"""KV bytes one long sequence holds, with and without sliding-window layers freeing the blocks
that fell out of their window (Gemma 3 1B and 4B shapes from bench/configs, bfloat16).

No device is needed: the real KVCacheManager runs a sequence of --context tokens (its prompt
in --chunk-token steps, then --decode single-token steps) and the peak of blocks it holds is
counted, group by group; `pagoda estimate`'s per-sequence figure and the cache as it was
before (every layer keeps every token, one block table) stand beside it.

    PYTHONPATH=. python bench/kv_window_memory.py [--context 32768] [--chunk 2048 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pagoda.kv_cache.block_pool import NULL_BLOCK_ID
from pagoda.kv_cache.groups import KVLayout, group_layers
from pagoda.kv_cache.hashing import BlockHasher
from pagoda.kv_cache.manager import KVCacheManager
from pagoda.models.estimate import estimate
from pagoda.models.registry import arch_spec
from pagoda.models.source import resolve_model
from pagoda.request import EngineCoreRequest, Request
from pagoda.sampling_params import SamplingParams

BLOCK = 16
BF16 = 2
CONFIGS = Path(__file__).resolve().parent / "configs"


def block_bytes(layout: KVLayout) -> int:
    return BLOCK * 2 * layout.slots * layout.num_kv_heads * layout.head_dim * BF16


def held_blocks(layout: KVLayout, context: int, chunk: int, decode: int) -> tuple[int, int]:
    """Blocks (all groups) the manager holds while one sequence runs to `context`: at the
    peak, and at the last decode step."""
    kv = KVCacheManager(len(layout.groups) * (context // BLOCK + 2) + 1, BLOCK, True,
                        BlockHasher(BLOCK, "bench"), layout.windows)
    prompt = [(7 * i) % 50000 for i in range(context - decode)]
    request = Request.from_core_request(
        EngineCoreRequest("r", prompt, SamplingParams(max_tokens=decode)), decode, 0)
    peak = held = 0
    while request.num_computed_tokens < context:
        n = min(chunk, request.num_tokens - request.num_computed_tokens)
        if n == 0:  # prompt done: decode one sampled token a step
            request.append_output_token(1)
            n = 1
        if kv.allocate_slots(request, n) is None:
            raise RuntimeError("the simulated pool is too small")
        request.num_computed_tokens += n
        held = sum(b != NULL_BLOCK_ID for table in kv.block_ids("r") for b in table)
        peak = max(peak, held)
    return peak, held


def rows(name: str, context: int, chunks: list[int], decode: int) -> list[str]:
    source = resolve_model(str(CONFIGS / name), "dummy")
    spec = arch_spec(source.hf_config)
    layout = group_layers(spec.layer_attention(source.hf_config))
    page = block_bytes(layout)
    out = []
    for chunk in chunks:
        e = estimate(source, context, device="cuda", dtype="bfloat16", token_budget=chunk)
        peak, held = (n * page for n in held_blocks(layout, context, chunk, decode))
        before = -(-context // BLOCK) * BLOCK * e.kv_bytes_per_token
        out.append(f"| {name} | {len(layout.groups)} ({layout.slots} slots) | {chunk} | "
                   f"{before / 2**20:.0f} | {peak / 2**20:.1f} | {e.kv_bytes_per_seq / 2**20:.1f}"
                   f" | {before / peak:.2f}x | {held / 2**20:.1f} ({before / held:.2f}x) |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--chunk", type=int, nargs="+", default=[2048, 512])
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=["gemma-3-1b", "gemma-3-4b"])
    args = parser.parse_args()
    print(f"KV bytes of one {args.context}-token sequence (bfloat16, MiB): before = every "
          "layer keeps every token; peak = the manager's most with window freeing (a prefill "
          "chunk's step); estimate = `pagoda estimate`'s kv_bytes_per_seq; decoding = held "
          f"at the last of {args.decode} decode steps")
    print("| model | KV groups | chunk | before | peak | estimate | saved at peak | decoding |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        for line in rows(name, args.context, args.chunk, args.decode):
            print(line)


if __name__ == "__main__":
    main()
