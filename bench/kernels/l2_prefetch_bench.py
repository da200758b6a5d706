"""Whether asking L2 for a product's weights while the kernel before it runs would shorten
one-token decode (CUDA, sm_90: `cp.async.bulk.prefetch.L2`).

At one token the small products of a layer (qkv, o) read their weights at well under the
device's copy rate, and the kernel before each reads little of its own (o follows the decode
attention). For each weight layout (bfloat16; 4-bit codes in groups of 128, as AWQ; float8
rows) and each pair (the kernel before, the product), in CUDA graphs, one run:

- `cold`: the product alone, over distinct weight copies (none in L2 from one call to the
  next); `hot`: the same copy every call (in L2);
- `after`: the kernel before, then the product (the product's time: the pair's less the
  kernel before's alone);
- `prefetched`: the same, with the product's weights asked of L2 from a second stream as
  the kernel before starts (bulk prefetches, one instruction a chunk, one warp a program;
  chunks of each of CHUNKS bytes), joined before the product.

`prefetched` near `hot` and the kernel before no slower says the reads can move into the
kernel before; `prefetched` near `after`, that they cannot. The kernels before: a 6 us
spin that reads nothing (`torch.cuda._sleep`, a stand-in for the attention), or another
product (down before qkv, as a layer's end before the next layer's start). On an H100 the
4-bit products in L2 were only 1.2-1.3 us faster than cold, and the same prefetch in the
engine made decode slower (bench/results/README.md, thirty-second session): not kept.

    PYTHONPATH=. python bench/kernels/l2_prefetch_bench.py [--output-json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone

import torch
import triton
import triton.language as tl

os.environ.setdefault("PAGODA_PDL", "0")  # fork and join edges: plain launches throughout

from bench.kernels.quant_bench import PROJECTIONS, layer_weights, product  # noqa: E402
from pagoda.bench.roofline import measure_ceilings  # noqa: E402

COLD_BYTES = 256 << 20  # weights read per timed sequence: several times the H200's L2
CHUNKS = [4 << 10, 16 << 10, 64 << 10]  # bytes a bulk prefetch, tried in turn
LANES = 32  # prefetches a program (one warp, one each)
SPIN_US = 6.0
PAIRS = [("spin", "o"), ("spin", "qkv"), ("down", "qkv"), ("o", "gate_up")]
LAYOUTS = [None, "int4-g128", "fp8-row"]


@triton.jit
def _bulk_prefetch_kernel(base, nbytes, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """Ask L2 for `base`'s first `nbytes` (whole 16-byte units), a CHUNK a lane."""
    lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
    start = lane.to(tl.int64) * CHUNK
    size = (tl.minimum(nbytes - start, CHUNK) // 16 * 16).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0;\n\t"
        "@p cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0; }",
        "=r,l,r", [base.to(tl.pointer_type(tl.int8)) + start, size], dtype=tl.int32,
        is_pure=False, pack=1)


def tensors_of(weight) -> list[torch.Tensor]:
    if isinstance(weight, torch.Tensor):
        return [weight]
    return [t for t in (*weight.parameters(), *weight.buffers()) if t.numel()]


def prefetch(weight, chunk: int) -> None:
    """Ask L2 for every byte of `weight`'s tensors, in bulk prefetches of `chunk` bytes."""
    for t in tensors_of(weight):
        nbytes = t.numel() * t.element_size()
        grid = (triton.cdiv(triton.cdiv(nbytes, chunk), LANES),)
        _bulk_prefetch_kernel[grid](t, nbytes, CHUNK=chunk, LANES=LANES, num_warps=1)


def nbytes_of(weight) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(weight))


def graph_us(body, reps: int) -> float:
    """Median time of one `body()` over replays of a graph of `reps` of them, in us."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            body()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def spin_cycles() -> int:
    """Cycles of torch.cuda._sleep that take about SPIN_US."""
    probe = 10_000
    us = graph_us(lambda: torch.cuda._sleep(probe), 64)
    return int(probe * SPIN_US / us)


class Sequence:
    """Copies of one layer's weights cycled call by call, each call's kernel before."""

    def __init__(self, layout: str | None, before: str, name: str, cycles: int) -> None:
        first = layer_weights(layout)
        self.copies = max(4, -(-COLD_BYTES // nbytes_of(first[name])))
        self.layers = [first] + [layer_weights(layout) for _ in range(self.copies - 1)]
        self.before, self.name, self.cycles = before, name, cycles
        self.x = {n: torch.randn(1, i, device="cuda", dtype=torch.bfloat16)
                  for n, (_, i) in PROJECTIONS.items()}
        self.i = 0

    def _next(self) -> dict:
        layer = self.layers[self.i % self.copies]
        self.i += 1
        return layer

    def run_before(self, layer: dict) -> None:
        if self.before == "spin":
            torch.cuda._sleep(self.cycles)
        else:
            product(self.x[self.before], layer[self.before])

    def cold(self) -> None:
        product(self.x[self.name], self._next()[self.name])

    def hot(self) -> None:
        product(self.x[self.name], self.layers[0][self.name])

    def before_alone(self) -> None:
        self.run_before(self._next())

    def after(self) -> None:
        layer = self._next()
        self.run_before(layer)
        product(self.x[self.name], layer[self.name])

    def prefetched(self, side: torch.cuda.Stream, chunk: int) -> None:
        layer = self._next()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            prefetch(layer[self.name], chunk)
        self.run_before(layer)
        torch.cuda.current_stream().wait_stream(side)
        product(self.x[self.name], layer[self.name])


def measure(layout: str | None, before: str, name: str, cycles: int, bandwidth: float) -> dict:
    seq = Sequence(layout, before, name, cycles)
    reps, side = seq.copies * 4, torch.cuda.Stream()
    row = {"layout": layout or "bf16", "before": before, "product": name,
           "weight_bytes": nbytes_of(seq.layers[0][name]), "copies": seq.copies,
           "cold_us": graph_us(seq.cold, reps), "hot_us": graph_us(seq.hot, reps),
           "before_us": graph_us(seq.before_alone, reps)}
    row["after_us"] = graph_us(seq.after, reps) - row["before_us"]
    for chunk in CHUNKS:
        row[f"prefetched_{chunk >> 10}k_us"] = \
            graph_us(lambda: seq.prefetched(side, chunk), reps) - row["before_us"]
    row["cold_fraction_of_bandwidth"] = row["weight_bytes"] / (row["cold_us"] * 1e-6) / bandwidth
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    ceil = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    cycles = spin_cycles()
    result = {"device": ceil.device, "bandwidth_gb_s": ceil.bandwidth / 1e9, "argv": sys.argv,
              "date": datetime.now(timezone.utc).isoformat(), "spin_cycles": cycles,
              "rows": []}
    print(f"{ceil.device}: copy bandwidth {ceil.bandwidth / 1e9:.0f} GB/s; spin {cycles} cycles")
    print(f"{'layout':>10} {'before':>6} {'product':>8} {'MB':>6} {'cold':>7} {'hot':>7} "
          f"{'before':>7} {'after':>7} "
          + " ".join(f"{f'pf {chunk >> 10}k':>7}" for chunk in CHUNKS) + " (us)")
    for layout in LAYOUTS:
        for before, name in PAIRS:
            row = measure(layout, before, name, cycles, ceil.bandwidth)
            result["rows"].append(row)
            print(f"{row['layout']:>10} {before:>6} {name:>8} {row['weight_bytes'] / 1e6:>6.1f} "
                  f"{row['cold_us']:>7.2f} {row['hot_us']:>7.2f} {row['before_us']:>7.2f} "
                  f"{row['after_us']:>7.2f} "
                  + " ".join(f"{row[f'prefetched_{chunk >> 10}k_us']:>7.2f}" for chunk in CHUNKS),
                  flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
