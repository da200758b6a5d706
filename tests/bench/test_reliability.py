"""`pagoda bench reliability --profile short` against real servers (tiny random-weight model
with SmolLM2's tokenizer): every phase runs, and the suite's own targets hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.utils import tiny_chat_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return str(tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir))


def test_short_profile_runs_every_phase_and_meets_its_targets(tiny_model, tmp_path):
    out = tmp_path / "reliability.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pagoda.cli.main", "bench", "reliability", "--model", tiny_model,
         "--profile", "short", "--server-args", "--kv-cache-memory 16MiB",
         "--soak-client-processes", "2",
         "--output-json", str(out), "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=400)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    unmet = [name for name, met in report["verdict"].items() if not met]
    assert report["verdict"] and not unmet, (unmet, _unwanted_outcomes(report))
    assert proc.returncode == 0
    fuzz = report["fuzz"]
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /health",
            "GET /ready", "GET /live"} <= set(fuzz["routes"])
    assert fuzz["cases"] >= 40 and fuzz["generated"] >= 1 and fuzz["server_5xx"] == 0
    soak = report["soak"]
    assert soak["sent"] > soak["workers"] and soak["completed"] > 0 and soak["cancelled"] > 0
    assert soak["client_processes"] == 2
    assert 0 < soak["server_ttft_p99_at_most_s"] < float("inf")
    assert not any(soak["residue_after"].values())
    means = soak["server_means_s"]  # the server's own histograms over the soak
    assert 0 < means["ttft"] and 0 <= means["queue"] <= means["ttft"] and means["itl"] > 0
    assert set(soak["ttft_p99_by_n_s"]) == {"1", "2", "3"}  # the tail by choices asked for
    kill = report["faults"]["engine_kill"]
    assert kill["to_unhealthy_s"] < 5 and kill["to_exit_s"] < 30 and kill["exit_code"] != 0
    stop = report["faults"]["engine_stop"]
    assert stop["to_unhealthy_s"] is not None and stop["live_while_stopped"] == 503
    assert report["faults"]["server_term"]["exit_code"] == 0
    swaps = report["swaps"]
    assert swaps["completed"] > 0 and not swaps["half_loaded"]
    assert any("loading" in k or "waking" in k for k in swaps["transitions_seen"])


def _unwanted_outcomes(report: dict) -> dict:
    """Each phase's samples of its unwanted outcomes, to say why a target was missed."""
    phases = {name: report.get(name, {}) for name in ("fuzz", "soak", "swaps")}
    phases.update(report.get("faults", {}))
    return {name: figures["samples"] for name, figures in phases.items()
            if isinstance(figures, dict) and figures.get("samples")}


def test_a_reset_on_arrival_as_the_server_exits_is_refused_not_lost():
    """Near the server's exit, a request that got no status and failed at once met a server
    going away (refused); one that failed after running, or long before the exit, or with a
    status, stays lost."""
    from pagoda.bench.reliability.faults import _refused_at_exit
    from pagoda.bench.reliability.load import LoadResult, Outcome
    t0, exit_after = 100.0, 0.8  # the fault at t0, the server gone 0.8 s later
    at_exit = Outcome("lost", 100.75, 100.76, False, 1, detail="ReadError('')")
    ran_then_cut = Outcome("lost", 99.0, 100.79, True, 1)  # in flight for 1.8 s
    long_before = Outcome("lost", 90.0, 90.01, False, 1)
    with_status = Outcome("lost", 100.75, 100.76, False, 1, status=200)
    result = LoadResult(outcomes=[at_exit, ran_then_cut, long_before, with_status])
    _refused_at_exit(result, {"t0": t0, "to_exit_s": exit_after})
    assert [o.kind for o in result.outcomes] == ["refused", "lost", "lost", "lost"]
    assert at_exit.detail.startswith("reset on arrival as the server exited")
    never_exited = LoadResult(outcomes=[Outcome("lost", 100.75, 100.76, False, 1)])
    _refused_at_exit(never_exited, {"t0": t0, "to_exit_s": None})
    assert never_exited.outcomes[0].kind == "lost"


def test_the_exit_race_counts_from_when_the_server_stopped_listening():
    """On a busy machine the process ends seconds after it stopped listening: a reset on
    arrival just before the first refused connection is refused, not lost, however late the
    exit; one long before that stays lost."""
    from pagoda.bench.reliability.faults import _refused_at_exit
    from pagoda.bench.reliability.load import LoadResult, Outcome
    t0, exit_after = 100.0, 4.0  # stopped listening at 100.6, ended at 104.0
    reset = Outcome("lost", 100.2, 100.5, False, 1, detail="RemoteProtocolError()")
    earlier = Outcome("lost", 98.5, 98.6, False, 1)  # before the fault: a real loss
    first_refused = Outcome("refused", 100.6, 100.6, False, 1)
    result = LoadResult(outcomes=[reset, earlier, first_refused])
    _refused_at_exit(result, {"t0": t0, "to_exit_s": exit_after})
    assert [o.kind for o in result.outcomes] == ["refused", "lost", "refused"]


def test_a_quantile_is_bounded_by_the_first_bucket_holding_its_share():
    from pagoda.bench.reliability.soak import quantile_bound
    inf = float("inf")
    before = {0.1: 10.0, 0.25: 20.0, inf: 20.0}
    after = {0.1: 60.0, 0.25: 118.0, inf: 120.0}  # between them: 50, 98, 100 observations
    assert quantile_bound(before, after, 0.5) == 0.1
    assert quantile_bound(before, after, 0.95) == 0.25
    assert quantile_bound(before, after, 0.99) == inf
    assert quantile_bound(after, after, 0.99) is None


def test_the_slowest_first_tokens_are_placed_by_the_second_they_were_sent_in():
    from pagoda.bench.reliability.load import LoadResult, Outcome
    result = LoadResult(started=100.0)
    # 200 completed streams over 10 s, TTFT 0.05 s, but the two slowest (0.9 s) sent in
    # second 7; a non-streamed request and a shed one carry no TTFT worth ranking
    for i in range(200):
        result.outcomes.append(Outcome("completed", 100.0 + i / 20, 101.0, True, 1,
                                       200, 0.05))
    result.outcomes[140].ttft = result.outcomes[141].ttft = 0.9
    result.outcomes.append(Outcome("completed", 105.0, 106.0, False, 1, 200))
    result.outcomes.append(Outcome("shed", 102.0, 102.0, True, 1, 503, 5.0))
    assert result.slowest_ttft_seconds() == {"requests": 2, "seconds": 1, "busiest": {7: 2}}
    assert LoadResult().slowest_ttft_seconds() == {"requests": 0, "seconds": 0, "busiest": {}}


def test_one_scrape_gives_series_summed_over_models_and_histogram_buckets():
    """The parsers read what prometheus_client writes: a gauge of two models summed, a
    histogram's cumulative buckets summed over them, +Inf the total."""
    from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

    from pagoda.bench.reliability.server import histogram_buckets, series_values
    registry = CollectorRegistry()
    running = Gauge("vllm:num_requests_running", "running", ["model_name"], registry=registry)
    queue = Histogram("vllm:request_queue_time_seconds", "queue", ["model_name"],
                      buckets=(0.1, 1.0), registry=registry)
    running.labels(model_name="a").set(2)
    running.labels(model_name="b").set(3)
    for model, seconds in (("a", 0.05), ("b", 0.5), ("b", 5.0)):
        queue.labels(model_name=model).observe(seconds)
    text = generate_latest(registry).decode()
    assert series_values(text, ("vllm:num_requests_running", "vllm:num_requests_waiting")) == \
        {"vllm:num_requests_running": 5.0, "vllm:num_requests_waiting": 0.0}
    assert histogram_buckets(text, ("vllm:request_queue_time_seconds",)) == \
        {"vllm:request_queue_time_seconds": {0.1: 1.0, 1.0: 2.0, float("inf"): 3.0}}
