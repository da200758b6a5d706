"""The table printed at the end of a serving benchmark."""

from __future__ import annotations

from typing import Any

WIDTH = 50
METRIC_TITLES = {"ttft": ("Time to First Token", "TTFT"),
                 "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
                 "itl": ("Inter-token Latency", "ITL"),
                 "e2el": ("End-to-end Latency", "E2EL")}


def format_report(metrics: dict[str, Any], errors: dict[str, int],
                  max_concurrency: int | None, request_rate: float) -> str:
    """The summary table; failures are listed by error below it."""
    lines = [" Serving Benchmark Result ".center(WIDTH, "=")]
    rows: list[tuple[str, Any]] = [
        ("Successful requests:", metrics["completed"]),
        ("Failed requests:", metrics["failed"]),
        ("Request rate configured (RPS):", request_rate),
        ("Maximum request concurrency:", max_concurrency if max_concurrency else "unlimited"),
        ("Peak concurrent requests:", metrics["max_concurrency_seen"]),
        ("Benchmark duration (s):", metrics["duration_s"]),
        ("Total input tokens:", metrics["total_input_tokens"]),
        ("Total generated tokens:", metrics["total_output_tokens"]),
        ("Request throughput (req/s):", metrics["request_throughput"]),
        ("Output token throughput (tok/s):", metrics["output_throughput"]),
        ("Total token throughput (tok/s):", metrics["total_token_throughput"]),
    ]
    if "goodput" in metrics:
        rows.append(("Request goodput (req/s):", metrics["goodput"]["request_goodput"]))
    lines += [_row(label, value) for label, value in rows]
    for name, (title, short) in METRIC_TITLES.items():
        if name not in metrics:
            continue
        lines.append(f" {title} ".center(WIDTH, "-"))
        for key, value in metrics[name].items():
            stat = key.removesuffix("_ms")
            label = {"mean": "Mean", "median": "Median", "std": "Std"}.get(stat, stat.upper())
            lines.append(_row(f"{label} {short} (ms):", value))
    lines.append("=" * WIDTH)
    for error, count in sorted(errors.items(), key=lambda e: -e[1])[:10]:
        lines.append(f"failed x{count}: {error}")
    return "\n".join(lines)


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        text = "inf" if value == float("inf") else f"{value:.2f}"
    else:
        text = str(value)
    return f"{label:<{WIDTH - 12}}{text:>12}"
