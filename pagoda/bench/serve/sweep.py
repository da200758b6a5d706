"""`--sweep`: the benchmark at several request rates or concurrencies, one JSON, one plot.

Synthetic datasets are drawn afresh for each point (seed + point index), so a server's
prefix cache cannot carry one point's prompts into the next.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from pagoda.bench.serve.benchmark import (
    ServeBenchConfig,
    build_requests,
    describe,
    print_report,
    run_once,
)

SWEEP_PARAMETERS = ("request-rate", "max-concurrency")


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    """`max-concurrency=1,4,16` → ("max-concurrency", [1, 4, 16])."""
    name, sep, values = spec.partition("=")
    if not sep or name not in SWEEP_PARAMETERS:
        raise ValueError(f"--sweep takes request-rate=R1,R2,... or max-concurrency=C1,C2,...; "
                         f"got {spec!r}")
    try:
        points = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep {spec!r}: values must be numbers (or inf)") from None
    if not points or any(not p > 0 for p in points):
        raise ValueError(f"--sweep {spec!r}: give one or more positive values")
    if name == "max-concurrency" and any(math.isinf(p) or p != int(p) for p in points):
        raise ValueError(f"--sweep {spec!r}: concurrencies are whole numbers")
    return name, points


def point_config(cfg: ServeBenchConfig, parameter: str, value: float,
                 prompts_per_concurrency: int | None = None) -> ServeBenchConfig:
    """The benchmark at one sweep value; with `prompts_per_concurrency`, a concurrency sweep
    sends that many prompts per slot, so every point runs the same number of waves."""
    if parameter == "request-rate":
        return replace(cfg, run=replace(cfg.run, request_rate=value))
    point = replace(cfg, run=replace(cfg.run, max_concurrency=int(value)))
    if prompts_per_concurrency:
        point.dataset = replace(cfg.dataset, num_prompts=int(value) * prompts_per_concurrency)
    return point


def run_sweep(cfg: ServeBenchConfig, tokenizer: Any, parameter: str, values: list[float],
              prompts_per_concurrency: int | None = None) -> dict[str, Any]:
    """Every point in turn; the document holds each point's figures and request timings."""
    if prompts_per_concurrency is not None and (parameter != "max-concurrency"
                                                or prompts_per_concurrency < 1):
        raise ValueError("--sweep-prompts-per-concurrency needs a max-concurrency sweep "
                         "and a value of at least 1")
    points = []
    for i, value in enumerate(values):
        point = point_config(cfg, parameter, value, prompts_per_concurrency)
        print(f"--- {parameter} = {value:g}")
        result = run_once(point, build_requests(point, tokenizer, seed_offset=i))
        print_report(point, result)
        points.append({"value": "inf" if math.isinf(value) else value,
                       "num_prompts": len(result.records), **result.to_json()})
    sweep = {"parameter": parameter, "values": [p["value"] for p in points]}
    return {**describe(cfg), "sweep": sweep, "points": points}


def _value_label(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def plot_sweep(document: dict[str, Any], path: Path) -> Path:
    """Output throughput against median TTFT and median TPOT, each point labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parameter = document["sweep"]["parameter"]
    points = document["points"]
    throughput = [p["metrics"]["output_throughput"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in ((axes[0], "ttft", "median TTFT (ms)"),
                              (axes[1], "tpot", "median TPOT (ms)")):
        latency = [p["metrics"].get(metric, {}).get("median_ms", float("nan")) for p in points]
        ax.plot(throughput, latency, marker="o")
        for x, y, p in zip(throughput, latency, points, strict=True):
            ax.annotate(_value_label(p["value"]), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    label = document.get("label") or document["request_settings"]["model"]
    fig.suptitle(f"{label}: sweep over {parameter} (point labels)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
