"""`pagoda serve` with parallel sizes: --data-parallel-size becomes engine replicas behind one
endpoint (the fleet's replica router, as `replicas:` in a models file), each replica split
over its own GPUs with -tp/-pp, and the sizes that cannot be combined stop it with one line
and status 2."""

from __future__ import annotations

import pytest

from pagoda.cli.main import build_parser, parse
from pagoda.cli.serve import run_serve
from tests.utils import logged_messages


def serve(argv: list[str], monkeypatch):
    """run_serve's exit status, and the fleet it would serve (None if it serves none)."""
    from pagoda.entrypoints.openai import server
    served = []
    monkeypatch.setattr(server, "serve_fleet", lambda fleet, *a, **k: served.append(fleet) or 0)
    argv = ["serve", *argv]
    return run_serve(parse(build_parser(argv), argv)), (served[0] if served else None)


def test_data_parallel_replicas_serve_one_model_through_the_replica_router(monkeypatch):
    status, fleet = serve(["tiny-dir", "-dp", "2", "--served-model-name", "tiny",
                           "--device", "cpu", "--max-num-seqs", "8"], monkeypatch)
    assert status == 0
    (spec,) = fleet.models
    assert (spec.model, spec.name, spec.replicas, spec.devices) == ("tiny-dir", "tiny", 2, [])


def test_split_replicas_take_their_ranks_gpus_in_turn(monkeypatch):
    """-dp 2 -tp 2: two replicas of two tensor-parallel ranks each; with four GPUs the
    second replica's ranks start at cuda:2."""
    from pagoda.fleet import devices
    monkeypatch.setattr(devices, "gpus", lambda: [object()] * 4)
    status, fleet = serve(["tiny-dir", "-dp", "2", "-tp", "2"], monkeypatch)
    assert status == 0
    (spec,) = fleet.models
    assert (spec.replicas, spec.devices) == (2, ["cuda:0", "cuda:2"])


def test_split_replicas_on_too_few_gpus_are_refused(monkeypatch, capsys):
    from pagoda.fleet import devices
    monkeypatch.setattr(devices, "gpus", lambda: [object()] * 3)
    status, fleet = serve(["tiny-dir", "-dp", "2", "-tp", "2"], monkeypatch)
    assert (status, fleet) == (1, None)
    assert "needs 4 GPUs; 3 visible" in capsys.readouterr().err


@pytest.mark.parametrize("argv, problem", [
    (["a", "b", "-tp", "2"], "need a single model"),
    (["a", "b", "-pp", "2"], "need a single model"),
    (["a", "b", "-dp", "2"], "--data-parallel-size serves one model"),
    (["m", "-dp", "0"], "--data-parallel-size must be at least 1"),
])
def test_sizes_that_do_not_combine_yet_are_refused(argv, problem, monkeypatch, capsys):
    status, fleet = serve(argv, monkeypatch)
    assert (status, fleet) == (2, None)
    assert problem in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["a", "b"], ["m", "-dp", "2"]])
def test_a_kv_cache_size_is_left_to_the_planner_with_one_startup_line(argv, monkeypatch):
    """The planner hands each engine of a fleet its KV budget: --kv-cache-memory is not acted
    on there, and the startup says so (a single model's engine takes it as its budget)."""
    with logged_messages("pagoda.cli") as messages:
        status, fleet = serve([*argv, "--device", "cpu", "--kv-cache-memory", "256MiB"],
                              monkeypatch)
    assert status == 0 and fleet is not None
    assert [m for m in messages if m.startswith("--kv-cache-memory ignored")] == [messages[-1]]
    with logged_messages("pagoda.cli") as messages:
        serve([*argv, "--device", "cpu"], monkeypatch)
    assert not any("--kv-cache-memory" in m for m in messages)
