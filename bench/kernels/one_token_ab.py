"""A one-token GEMV against the few-token kernel, one token, one Llama-3.1-8B layer's four
projections in one of quant_bench.py's layouts (default int4-g128; int8-g32-centred: GGUF
Q8_0's bytes): alternated three times in one process (CUDA-graph medians; the layers rotate
through more weights than the L2 cache holds). Like quant_bench.py, without programmatic
dependent launch unless --pdl is given. (A layout on planes takes the planes kernel either
way.)

    PYTHONPATH=. python bench/kernels/one_token_ab.py [--layout int8-g32-centred] [--pdl]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).parent))
import quant_bench  # noqa: E402

from pagoda.bench.roofline import measure_ceilings  # noqa: E402
from pagoda.layers.quantization import triton_group_gemm as kernels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdl", action="store_true",
                        help="launch with programmatic dependent launch, as the engine does")
    parser.add_argument("--layout", choices=sorted(quant_bench.LAYOUTS), default="int4-g128")
    args = parser.parse_args()
    os.environ["PAGODA_PDL"] = "1" if args.pdl else "0"  # read at first launch
    bandwidth = measure_ceilings(torch.device("cuda"), torch.bfloat16).bandwidth
    xs = quant_bench.inputs(1)
    call, layers, nbytes = quant_bench.layers_call(args.layout)
    shipped = kernels.takes_one_token_gemv
    routes = {"one-token": shipped, "few-token": lambda tokens, weight: False}
    try:
        for round_ in range(3):
            for name, route in routes.items():
                kernels.takes_one_token_gemv = route
                ms = do_bench_cudagraph(lambda: call(xs), rep=100) / layers
                print(f"round {round_} {name}: {1e3 * ms:.1f} us, "
                      f"{100 * nbytes / (ms / 1e3) / bandwidth:.1f}% of the copy bandwidth",
                      flush=True)
    finally:
        kernels.takes_one_token_gemv = shipped


if __name__ == "__main__":
    main()
