"""Microbenchmark of pagoda's Triton attention kernels on CUDA (Llama-3.1-8B attention shape).

Decode at batch 1/8/64/256 x context 1k/4k/8k: the unified kernel unsplit, split-KV (best
segment count) and the heuristic's choice; achieved KV-read bandwidth (K and V bytes of every
sequence / median time) as a fraction of the device-copy bandwidth measured in the same run
((read + write bytes) / time of a large torch copy). Plus the whole backend forward (store +
attention) of torch_ref vs triton at a few decode points, and prefill chunks in TFLOP/s.
Times are triton.testing.do_bench medians, L2 flushed before each repetition. With
--new-token: decode steps' RoPE and KV store inside the attention kernel (NewToken) against
the separate rope_store_kv_ launch before it, per layer in CUDA graphs, at --batches x
--contexts.

    PYTHONPATH=. python bench/kernels/attention_bench.py [--sweep] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from pagoda.layers.attention.metadata import CommonAttentionMetadata
from pagoda.layers.attention.torch_ref import TorchAttentionBackend
from pagoda.layers.attention.triton_backend import TritonAttentionBackend
from pagoda.layers.attention.triton_unified import (
    AttentionPlan,
    KernelConfig,
    NewToken,
    plan_attention,
    unified_attention,
)
from pagoda.layers.fused import rope_store_kv_
from pagoda.layers.rotary import RotaryEmbedding

# --kv-dtype: the cache's element type (auto: the queries' --dtype), as --kv-cache-dtype
KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
             "fp8_e5m2": torch.float8_e5m2}


@dataclass
class Inputs:
    """One step's tensors: q/k/v of the new tokens, the KV cache and the metadata."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache: torch.Tensor
    meta: CommonAttentionMetadata

    @property
    def kv_bytes(self) -> int:
        """K and V bytes attention must read: every sequence's whole context."""
        _, _, _, kv_heads, dim = self.kv_cache.shape
        return sum(self.meta.seq_lens_cpu) * kv_heads * dim * 2 * self.kv_cache.element_size()

    @property
    def flops(self) -> int:
        """QK^T and PV multiply-adds over the causally visible keys, x2."""
        heads, dim = self.q.shape[1], self.q.shape[2]
        visible = 0
        for n, total in zip(self.meta.query_lens_cpu, self.meta.seq_lens_cpu):
            visible += n * (total - n) + n * (n + 1) // 2
        return 4 * heads * dim * visible


def make_inputs(seqs: list[tuple[int, int]], args: argparse.Namespace, seed: int = 0) -> Inputs:
    """seqs: (cached context, new tokens). Pages are scattered at random over the cache."""
    dev, bs, dtype = torch.device("cuda"), args.block_size, getattr(torch, args.dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    per_seq = [-(-(c + n) // bs) for c, n in seqs]
    num_blocks = 1 + sum(per_seq)
    kv_cache = torch.randn(2, num_blocks, bs, args.kv_heads, args.head_dim, device=dev,
                           dtype=dtype, generator=gen).to(KV_DTYPES.get(args.kv_dtype, dtype))
    order = (torch.randperm(num_blocks - 1, device=dev, generator=gen) + 1).int()
    tables = torch.zeros(len(seqs), max(per_seq), dtype=torch.int32, device=dev)
    slots, qsl, lens, used = [], [0], [], 0
    for i, (context, query) in enumerate(seqs):
        tables[i, :per_seq[i]] = order[used:used + per_seq[i]]
        used += per_seq[i]
        pos = torch.arange(context, context + query, device=dev)
        slots.append(tables[i, pos // bs].long() * bs + pos % bs)
        qsl.append(qsl[-1] + query)
        lens.append(context + query)
    tokens = qsl[-1]
    meta = CommonAttentionMetadata(
        num_tokens=tokens, num_seqs=len(seqs), max_query_len=max(n for _, n in seqs),
        max_seq_len=max(lens), query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev), block_tables=tables,
        slot_mapping=torch.cat(slots), query_start_loc_cpu=qsl, seq_lens_cpu=lens, block_size=bs)
    rand = lambda h: torch.randn(tokens, h, args.head_dim, device=dev, dtype=dtype,  # noqa: E731
                                 generator=gen)
    return Inputs(rand(args.heads), rand(args.kv_heads), rand(args.kv_heads), kv_cache, meta)


def num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def make_plan(inp: Inputs, num_segments: int | None = None,
              config: KernelConfig | None = None) -> AttentionPlan:
    heads, kv_heads, dim = inp.q.shape[1], inp.k.shape[1], inp.q.shape[2]
    return plan_attention(heads, kv_heads, dim, inp.meta.query_lens_cpu, inp.meta.max_seq_len,
                          num_sms(), num_segments, config, inp.q.dtype,
                          cache_dtype=inp.kv_cache.dtype)


def time_attention(inp: Inputs, plan: AttentionPlan) -> float:
    """Median milliseconds of the attention kernel(s) alone (cache already filled)."""
    out = torch.empty_like(inp.q)
    m = inp.meta
    scale = inp.q.shape[2] ** -0.5

    def run() -> None:
        unified_attention(inp.q, inp.kv_cache[0], inp.kv_cache[1], m.query_start_loc,
                          m.seq_lens, m.block_tables, scale, m.num_seqs, plan, out=out)
    return do_bench(run, warmup=25, rep=100, return_mode="median")


def time_backend(inp: Inputs, backend) -> float:
    """Median milliseconds of backend.forward (KV store + attention); metadata built once."""
    meta = backend.build_metadata(inp.meta)
    scale = inp.q.shape[2] ** -0.5
    return do_bench(lambda: backend.forward(inp.q, inp.k, inp.v, inp.kv_cache, meta, scale),
                    warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbs(gib: float = 2.0) -> float:
    """Device-to-device copy of a large buffer: (read + write bytes) / median time, GB/s."""
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * n / (ms * 1e-3) / 1e9


def bench_decode(args: argparse.Namespace, copy_gbs: float) -> list[dict]:
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            inp = make_inputs([(context - 1, 1)] * batch, args, seed=batch + context)
            auto = make_plan(inp)
            t_unsplit = time_attention(inp, make_plan(inp, 1))
            best_split = min((time_attention(inp, make_plan(inp, s)), s) for s in (2, 4, 8, 16))
            t_auto = time_attention(inp, auto)
            kv_bytes = inp.kv_bytes
            gbs = lambda ms: kv_bytes / (ms * 1e-3) / 1e9  # noqa: E731
            rows.append({
                "batch": batch, "context": context, "kv_MB": inp.kv_bytes / 1e6,
                "unsplit_us": t_unsplit * 1e3, "split_us": best_split[0] * 1e3,
                "split_S": best_split[1], "auto_S": auto.num_segments, "auto_us": t_auto * 1e3,
                "auto_GB/s": gbs(t_auto), "auto_%copy": 100 * gbs(t_auto) / copy_gbs,
                "best_%copy": 100 * gbs(min(t_unsplit, best_split[0])) / copy_gbs,
            })
            _progress(rows[-1])
    return rows


def bench_backends(args: argparse.Namespace) -> list[dict]:
    """Whole forward (store + attention): torch_ref vs triton at a few decode points."""
    rows = []
    for batch, context in ((8, 4096), (64, 4096), (1, 8192)):
        inp = make_inputs([(context - 1, 1)] * batch, args, seed=7)
        t_torch = time_backend(inp, TorchAttentionBackend())
        t_triton = time_backend(inp, TritonAttentionBackend())
        rows.append({"batch": batch, "context": context, "torch_ref_us": t_torch * 1e3,
                     "triton_us": t_triton * 1e3, "speedup": t_torch / t_triton})
        _progress(rows[-1])
    return rows


def bench_prefill(args: argparse.Namespace) -> list[dict]:
    rows = []
    for label, seqs in (("2048 fresh", [(0, 2048)]), ("2048 after 4096", [(4096, 2048)]),
                        ("2048 after 8192", [(8192, 2048)]),
                        ("512 after 4096 + 64 decodes", [(4096, 512)] + [(4095, 1)] * 64)):
        inp = make_inputs(seqs, args, seed=3)
        plan = make_plan(inp)
        ms = time_attention(inp, plan)
        rows.append({"prefill": label, "block_m": plan.config.block_m, "us": ms * 1e3,
                     "TFLOP/s": inp.flops / (ms * 1e-3) / 1e12})
        _progress(rows[-1])
    return rows


def bench_sweep(args: argparse.Namespace, copy_gbs: float) -> list[dict]:
    """Kernel configs at a few points (to tune default_config); best first per point."""
    decode_cfgs = [KernelConfig(16, t, w, s) for t in (32, 64, 128) for w in (4, 8)
                   for s in (2, 3, 5)]
    prefill_cfgs = [KernelConfig(m, t, w, s) for m in (64, 128) for t in (32, 64, 128)
                    for w in (4, 8) for s in (2, 3)]
    points = [("decode B=1 ctx=8192", [(8191, 1)], None, decode_cfgs),
              ("decode B=64 ctx=4096", [(4095, 1)] * 64, 1, decode_cfgs),
              ("decode B=256 ctx=4096", [(4095, 1)] * 256, 1, decode_cfgs),
              ("prefill 2048 after 4096", [(4096, 2048)], 1, prefill_cfgs)]
    rows = []
    for label, seqs, segments, cfgs in points:
        inp = make_inputs(seqs, args, seed=11)
        results = []
        for cfg in cfgs:
            try:
                results.append((time_attention(inp, make_plan(inp, segments, cfg)), cfg))
            except Exception as exc:  # a config may exceed shared memory: skip it
                print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
        default = make_plan(inp, segments)
        for ms, cfg in sorted(results, key=lambda r: r[0])[:args.sweep_top]:
            rows.append({"point": label, "block_m": cfg.block_m, "tile": cfg.tile,
                         "warps": cfg.num_warps, "stages": cfg.num_stages, "us": ms * 1e3,
                         "%copy": 100 * inp.kv_bytes / (ms * 1e-3) / 1e9 / copy_gbs,
                         "TFLOP/s": inp.flops / (ms * 1e-3) / 1e12,
                         "default": "*" if cfg == default.config else ""})
            _progress(rows[-1])
    return rows


def time_layers_in_graph(inp: Inputs, caches: list[torch.Tensor], plan: AttentionPlan) -> float:
    """Median milliseconds per layer of attention replayed from a CUDA graph over one KV
    cache per layer, as a decode step runs it: no launch gaps, and the caches (more than L2
    holds) read from memory, not L2."""
    out = torch.empty_like(inp.q)
    m, scale = inp.meta, inp.q.shape[2] ** -0.5
    return _graph_ms_per_layer(
        lambda cache: unified_attention(inp.q, cache[0], cache[1], m.query_start_loc,
                                        m.seq_lens, m.block_tables, scale, m.num_seqs, plan,
                                        out=out), caches)


def _graph_ms_per_layer(layer, caches: list[torch.Tensor]) -> float:
    """Median milliseconds per layer of `layer(cache)` over each of `caches` (one a layer)
    replayed from a CUDA graph (compiled outside the capture)."""
    def step() -> None:
        for cache in caches:
            layer(cache)
    step()
    torch.cuda.synchronize()
    return do_bench_cudagraph(step, rep=50, return_mode="median") / len(caches)


def bench_graph_sweep(args: argparse.Namespace, copy_gbs: float) -> list[dict]:
    """Small-batch decode as CUDA graphs replay it: the plan is made at the capture length
    (`--capture-len`, as for max_model_len) while the real contexts are shorter; kernel
    configs x split-KV segments, best first per point."""
    cfgs = [KernelConfig(16, t, w, st) for t in (16, 32, 64) for w in (2, 4) for st in (1, 2, 3)]
    rows = []
    for batch, context in args.graph_points:
        inp = make_inputs([(context - 1, 1)] * batch, args, seed=batch)
        caches = [inp.kv_cache] + [inp.kv_cache.clone() for _ in range(31)]  # 32 layers
        captured = make_inputs([(args.capture_len - 1, 1)] * batch, args, seed=batch)
        default = make_plan(captured)
        results = []
        for segments in args.graph_segments:
            for cfg in cfgs:
                plan = make_plan(captured, segments, cfg)
                try:
                    results.append((time_layers_in_graph(inp, caches, plan), cfg, segments))
                except Exception as exc:  # a config may exceed shared memory: skip it
                    print(f"  skip {cfg} S={segments}: {type(exc).__name__}", file=sys.stderr)
        baseline = time_layers_in_graph(inp, caches, default)
        for ms, cfg, segments in sorted(results, key=lambda r: r[0])[:args.sweep_top]:
            rows.append({"batch": batch, "context": context, "tile": cfg.tile,
                         "warps": cfg.num_warps, "stages": cfg.num_stages, "S": segments,
                         "us": ms * 1e3, "default_us": baseline * 1e3,
                         "default": f"{default.config.tile}/{default.config.num_warps}/"
                                    f"{default.config.num_stages} S={default.num_segments}",
                         "%copy": 100 * inp.kv_bytes / (ms * 1e-3) / 1e9 / copy_gbs})
            _progress(rows[-1])
    return rows


# Llama 3.1's RoPE, for the --new-token comparison
LLAMA3_ROPE = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
GRAPH_CACHE_BYTES = 1 << 30  # the layers' caches of one --new-token point: several times L2


def time_new_token_in_graph(inp: Inputs, caches: list[torch.Tensor], rope: RotaryEmbedding,
                            in_attention: bool) -> float:
    """Median milliseconds per layer of a decode step's RoPE, KV store and attention
    replayed from a CUDA graph: in the attention kernel (NewToken, whatever the batch; the
    model takes it only where `takes_new_token`) or as the fused RoPE-and-store launch and
    then the attention kernel (PAGODA_ROPE_IN_ATTENTION=0)."""
    out = torch.empty_like(inp.q)
    m, scale, plan = inp.meta, inp.q.shape[2] ** -0.5, make_plan(inp)
    positions = (m.seq_lens - 1).long()

    def layer(cache: torch.Tensor) -> None:
        new = None
        if in_attention:
            new = NewToken(inp.k, inp.v, positions, rope.cos_sin, rope.rotary_dim,
                           m.slot_mapping)
        else:
            rope_store_kv_(positions, inp.q, inp.k, inp.v, rope.cos_sin, rope.rotary_dim,
                           cache[0], cache[1], m.slot_mapping)
        unified_attention(inp.q, cache[0], cache[1], m.query_start_loc, m.seq_lens,
                          m.block_tables, scale, m.num_seqs, plan, out=out, new_token=new)
    return _graph_ms_per_layer(layer, caches)


def bench_new_token(args: argparse.Namespace, copy_gbs: float) -> list[dict]:
    """NewToken against the separate RoPE-and-store launch at each batch x context, the two
    alternated twice (enough layers' caches that a step reads them from memory)."""
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            inp = make_inputs([(context - 1, 1)] * batch, args, seed=batch + context)
            cache_bytes = inp.kv_cache.numel() * inp.kv_cache.element_size()
            layers = max(1, min(32, -(-GRAPH_CACHE_BYTES // cache_bytes)))
            caches = [inp.kv_cache] + [inp.kv_cache.clone() for _ in range(layers - 1)]
            rope = RotaryEmbedding(args.head_dim, context, LLAMA3_ROPE).cuda()
            times = {True: [], False: []}
            for _ in range(2):
                for in_attention in (True, False):
                    times[in_attention].append(
                        time_new_token_in_graph(inp, caches, rope, in_attention))
            fused, apart = min(times[True]), min(times[False])
            plan = make_plan(inp)
            rows.append({"batch": batch, "context": context, "layers": layers,
                         "segments": plan.num_segments, "capped": plan.new_token_capped,
                         "model_takes_it": plan.rope_inside,
                         "in_attention_us": fused * 1e3, "apart_us": apart * 1e3,
                         "ratio": fused / apart,
                         "in_attention_%copy": 100 * inp.kv_bytes / (fused * 1e-3) / 1e9
                         / copy_gbs})
            _progress(rows[-1])
            del caches
    return rows


def _progress(row: dict) -> None:
    print("  " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()), file=sys.stderr, flush=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n## {title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--kv-dtype", default="auto", choices=["auto", *KV_DTYPES],
                   help="the KV cache's element type (auto: --dtype)")
    p.add_argument("--skip-backends", action="store_true", help="no torch_ref comparison")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--sweep", action="store_true", help="also sweep kernel configs")
    p.add_argument("--sweep-top", type=int, default=4, help="configs shown per sweep point")
    p.add_argument("--graph-sweep", action="store_true",
                   help="small-batch decode configs timed in CUDA graphs, then exit")
    p.add_argument("--new-token", action="store_true",
                   help="decode's RoPE and KV store in the attention kernel against their own "
                        "launch, in CUDA graphs at --batches x --contexts, then exit")
    p.add_argument("--capture-len", type=int, default=4096,
                   help="the sequence length graph-sweep plans are made at (max_model_len)")
    p.add_argument("--graph-points", type=_batch_by_context, nargs="+",
                   default=[(1, 1100), (8, 1100), (32, 600)],
                   help="graph-sweep points as BATCHxCONTEXT (default: 1x1100 8x1100 32x600)")
    p.add_argument("--graph-segments", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64],
                   help="split-KV segment counts the graph sweep tries")
    p.add_argument("--output-json", help="write the results here")
    return p.parse_args()


def _batch_by_context(text: str) -> tuple[int, int]:
    batch, _, context = text.partition("x")
    return int(batch), int(context)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_bench needs a CUDA device")
    started = datetime.now(timezone.utc).isoformat()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s", file=sys.stderr)
    if args.new_token:
        rows = bench_new_token(args, copy_gbs)
        print_table("decode RoPE + KV store + attention, us per layer: in the attention kernel "
                    "(NewToken) or apart (best of two)", rows)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump({"schema": "pagoda.bench.attention_new_token/1",
                           "device_name": torch.cuda.get_device_name(),
                           "commit": _git_commit(), "argv": sys.argv, "started_at": started,
                           "copy_bandwidth_gbs": copy_gbs, "rows": rows}, f, indent=1)
        return
    if args.graph_sweep:
        print_table("small-batch decode in CUDA graphs (us per layer, best first)",
                    bench_graph_sweep(args, copy_gbs))
        return
    tables = {"decode": bench_decode(args, copy_gbs)}
    if not args.skip_backends:
        tables["backends"] = bench_backends(args)
    if not args.skip_prefill:
        tables["prefill"] = bench_prefill(args)
    if args.sweep:
        tables["sweep"] = bench_sweep(args, copy_gbs)

    device = torch.cuda.get_device_name()
    print(f"\n# attention kernels on {device}: H={args.heads} KVH={args.kv_heads} "
          f"D={args.head_dim} {args.dtype} (KV cache: {args.kv_dtype}) "
          f"block={args.block_size}; torch {torch.__version__}, "
          f"triton {triton.__version__}; copy bandwidth {copy_gbs:.0f} GB/s (read+write)")
    titles = {"decode": "decode attention (us = median; S = split-KV segments; %copy = KV-read "
                        "GB/s / copy GB/s)",
              "backends": "backend forward, store + attention (torch_ref vs triton)",
              "prefill": "prefill attention", "sweep": "config sweep (best first)"}
    for name, rows in tables.items():
        print_table(titles[name], rows)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"schema": "pagoda.bench.attention_kernels/1", "device_name": device,
                       "torch": torch.__version__, "triton": triton.__version__,
                       "commit": _git_commit(), "argv": sys.argv, "started_at": started,
                       "finished_at": datetime.now(timezone.utc).isoformat(),
                       "config": vars(args), "copy_bandwidth_gbs": copy_gbs, "tables": tables},
                      f, indent=1)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - start:.0f} s)")
