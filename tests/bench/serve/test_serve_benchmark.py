"""`pagoda bench serve` against a real `pagoda serve` on SmolLM2: every reported figure is
recomputed here, independently, from the saved per-request timings."""

from __future__ import annotations

import json
import re
import statistics

import pytest

from pagoda.cli.main import main
from tests.utils import RemoteServer

PERCENTILES = (50, 90, 99)


@pytest.fixture(scope="module")
def server(smollm2_dir):
    srv = RemoteServer(str(smollm2_dir), "--served-model-name", "smollm2", "--max-model-len",
                       "256", "--kv-cache-memory", "64MiB", "--max-num-seqs", "8")
    yield srv
    srv.stop()


def bench(server, tmp_path, smollm2_dir, *args: str) -> tuple[int, dict]:
    out = tmp_path / "result.json"
    rc = main(["bench", "serve", "--base-url", server.url, "--tokenizer", str(smollm2_dir),
               "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path),
               "--result-filename", out.name, *args])
    return rc, json.loads(out.read_text()) if out.exists() else {}


def quantile(values: list[float], p: float) -> float:
    """The p-th percentile with linear interpolation between closest ranks."""
    if p == 50:
        return statistics.median(values)
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def expected_summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    out = {"mean_ms": statistics.fmean(ms), "median_ms": statistics.median(ms),
           "std_ms": statistics.pstdev(ms)}
    out.update({f"p{p}_ms": quantile(ms, p) for p in PERCENTILES})
    return out


def peak_overlap(requests: list[dict]) -> int:
    """Most requests in flight at any request's start (half-open intervals)."""
    spans = [(r["start_s"], r["start_s"] + r["e2el_s"]) for r in requests]
    return max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)


def test_reported_figures_match_the_saved_timings(server, tmp_path, smollm2_dir, capsys):
    rc, doc = bench(server, tmp_path, smollm2_dir, "--num-prompts", "12",
                    "--random-input-len", "40", "--random-range-ratio", "0.5",
                    "--random-output-len", "10", "--ignore-eos", "--request-rate", "30",
                    "--burstiness", "0.5", "--max-concurrency", "4", "--num-warmups", "2",
                    "--metric-percentiles", "50,90,99", "--goodput", "ttft:1500", "tpot:150")
    assert rc == 0
    requests, m = doc["requests"], doc["metrics"]
    ok = [r for r in requests if r["success"]]
    assert len(requests) == 12 and len(ok) == m["completed"] == 12 and m["failed"] == 0

    # the server's usage is the ground truth of token counts
    for r in ok:
        assert r["output_tokens"] == r["max_tokens"]  # ignore_eos
        assert r["prompt_tokens"] == r["expected_prompt_len"]
        assert 20 <= r["prompt_tokens"] <= 60
        assert len(r["itl_s"]) <= r["output_tokens"] - 1
        assert r["ttft_s"] + sum(r["itl_s"]) <= r["e2el_s"] + 1e-6

    last_end = max(r["start_s"] + r["e2el_s"] for r in ok)
    duration = m["duration_s"]
    assert last_end <= duration < last_end + 1.0
    inputs, outputs = sum(r["prompt_tokens"] for r in ok), sum(r["output_tokens"] for r in ok)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (inputs, outputs)
    assert m["request_throughput"] == pytest.approx(12 / duration)
    assert m["output_throughput"] == pytest.approx(outputs / duration)
    assert m["total_token_throughput"] == pytest.approx((inputs + outputs) / duration)

    tpots = [(r["e2el_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in ok]
    samples = {"ttft": [r["ttft_s"] for r in ok], "tpot": tpots,
               "itl": [g for r in ok for g in r["itl_s"]], "e2el": [r["e2el_s"] for r in ok]}
    for name, values in samples.items():
        for key, value in expected_summary(values).items():
            assert m[name][key] == pytest.approx(value, rel=1e-9, abs=1e-9), (name, key)

    assert m["max_concurrency_seen"] == peak_overlap(ok) <= 4
    good = sum(r["ttft_s"] * 1000 <= 1500 and t * 1000 <= 150 for r, t in zip(ok, tpots))
    assert m["goodput"]["good_requests"] == good
    assert m["goodput"]["request_goodput"] == pytest.approx(good / duration)

    # vLLM's flat keys, for its tools and notebooks
    assert doc["completed"] == 12 and doc["duration"] == duration
    assert doc["ttfts"] == [r["ttft_s"] for r in requests]
    assert doc["itls"] == [r["itl_s"] for r in requests]
    assert doc["input_lens"] == [r["prompt_tokens"] for r in requests]
    for name in samples:
        for key, value in m[name].items():
            stat = key.removesuffix("_ms")
            assert doc[f"{stat}_{name}_ms"] == value
    assert doc["request_goodput"] == m["goodput"]["request_goodput"]

    table = capsys.readouterr().out
    assert re.search(r"Successful requests:\s+12\n", table)
    assert f"{m['output_throughput']:.2f}" in table
    assert f"{m['tpot']['p99_ms']:.2f}" in table


def test_chat_endpoint_with_a_shared_prefix_workload(server, tmp_path, smollm2_dir):
    rc, doc = bench(server, tmp_path, smollm2_dir, "--backend", "openai-chat",
                    "--dataset-name", "shared-prefix", "--shared-prefix-groups", "2",
                    "--shared-prefix-prompts-per-group", "3", "--shared-prefix-len", "48",
                    "--shared-prefix-suffix-len", "8", "--output-len", "6", "--ignore-eos")
    assert rc == 0
    assert doc["request_settings"]["url"].endswith("/v1/chat/completions")
    ok = [r for r in doc["requests"] if r["success"]]
    assert len(ok) == 6
    for r in ok:
        assert r["output_tokens"] == 6
        assert r["prompt_tokens"] > r["expected_prompt_len"]  # the chat template adds tokens


def test_failed_requests_are_counted_with_their_errors(server, tmp_path, smollm2_dir):
    prompts = tmp_path / "prompts.jsonl"
    long = " ".join(["word"] * 400)  # beyond --max-model-len 256
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"prompt": "Tell me a story.", "max_tokens": 5}, {"prompt": long},
        {"prompt": "Name three colors.", "max_tokens": 5}, {"prompt": long}]))
    rc, doc = bench(server, tmp_path, smollm2_dir, "--dataset-name", "prompts",
                    "--dataset-path", str(prompts), "--num-prompts", "4", "--output-len", "5")
    assert rc == 0
    m = doc["metrics"]
    assert (m["completed"], m["failed"]) == (2, 2)
    failed = [r for r in doc["requests"] if not r["success"]]
    assert [r["index"] for r in failed] == [1, 3]
    assert all(r["error"].startswith("HTTP 400") for r in failed)
    assert doc["error_counts"] == {failed[0]["error"]: 2}
    assert doc["errors"] == ["", failed[0]["error"], "", failed[1]["error"]]  # vLLM's layout
    assert doc["output_lens"] == [r["output_tokens"] if r["success"] else 0
                                  for r in doc["requests"]]
    assert m["total_output_tokens"] == sum(r["output_tokens"] for r in doc["requests"]
                                           if r["success"])


def test_sweep_writes_one_json_and_a_plot(server, tmp_path, smollm2_dir):
    rc = main(["bench", "serve", "--base-url", server.url, "--tokenizer", str(smollm2_dir),
               "--disable-tqdm", "--random-input-len", "24", "--random-output-len", "6",
               "--ignore-eos", "--sweep", "max-concurrency=1,3",
               "--sweep-prompts-per-concurrency", "2",
               "--label", "pagoda", "--result-dir", str(tmp_path),
               "--result-filename", "sweep.json"])
    assert rc == 0
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert doc["sweep"] == {"parameter": "max-concurrency", "values": [1.0, 3.0]}
    for point in doc["points"]:
        assert point["metrics"]["completed"] == point["num_prompts"] == 2 * point["value"]
        assert point["metrics"]["max_concurrency_seen"] <= point["value"]
    assert doc["points"][0]["metrics"]["max_concurrency_seen"] == 1
    png = (tmp_path / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_a_wrong_model_stops_before_the_run(server, tmp_path, smollm2_dir, capsys):
    rc, doc = bench(server, tmp_path, smollm2_dir, "--model", "missing", "--num-prompts", "2")
    assert rc == 1 and doc == {}
    assert "initial test request failed: HTTP 404" in capsys.readouterr().err


def test_the_model_is_discovered_from_the_server(server, tmp_path, smollm2_dir):
    rc, doc = bench(server, tmp_path, smollm2_dir, "--num-prompts", "2",
                    "--random-input-len", "8", "--random-output-len", "2")
    assert rc == 0 and doc["request_settings"]["model"] == "smollm2"
