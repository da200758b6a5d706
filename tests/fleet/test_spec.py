"""Models files and command lines become FleetSpecs; keep_alive follows Ollama."""

from __future__ import annotations

import pytest

from pagoda.errors import ConfigError
from pagoda.fleet.spec import (
    FOREVER,
    fleet_from_args,
    fleet_from_yaml,
    parse_keep_alive,
)


@pytest.mark.parametrize(("value", "seconds"), [
    ("5m", 300), ("30s", 30), ("1h", 3600), ("1.5m", 90), ("250ms", 0.25), (90, 90),
    (0, 0), ("0", 0), (-1, FOREVER), ("-1", FOREVER), ("-5m", FOREVER)])
def test_keep_alive_durations(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "", None, True, "1e9x"])
def test_bad_keep_alive_is_refused(value):
    with pytest.raises(ConfigError, match="keep_alive"):
        parse_keep_alive(value)


def test_models_file(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("""
memory_limit: 20GiB
keep_alive: 10m
defaults: {max_model_len: 4096, dtype: bfloat16}
models:
  - model: smollm2
    name: smol
    aliases: [gpt-4o-mini]
    pinned: true
  - model: /models/llama
    keep_alive: 0
    priority: 5
    replicas: 2
    devices: [cuda:0, cuda:1]
    max_model_len: 2048
  - /models/other
""")
    fleet = fleet_from_yaml(path)
    assert fleet.memory_limit == 20 << 30 and fleet.keep_alive == 600
    smol, llama, other = fleet.models
    assert smol.names == ["smol", "gpt-4o-mini"] and smol.pinned
    assert smol.engine == {"max_model_len": 4096, "dtype": "bfloat16"}
    assert llama.name == "/models/llama" and llama.keep_alive == 0 and llama.priority == 5
    assert llama.device_of(1) == "cuda:1" and llama.engine["max_model_len"] == 2048
    assert other.model == "/models/other" and other.keep_alive is None and not other.pinned


@pytest.mark.parametrize(("text", "error"), [
    ("models: []", "no model"),
    ("models: [{name: x}]", "needs at least 'model"),
    ("models: [{model: a, colour: red}]", "unknown keys colour"),
    ("models: [{model: a}, {model: b, name: a}]", "used by both"),
    ("models: [{model: a, replicas: 2, devices: [cuda:0]}]", "1 devices for 2 replicas"),
    ("models: [{model: a, keep_alive: later}]", "keep_alive"),
    ("defaults: {gpu_memory_utilization: 0.5}\nmodels: [a]", "unknown keys"),
    ("just text", "a 'models' list"),
])
def test_bad_models_files_name_the_problem(tmp_path, text, error):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        fleet_from_yaml(path)


def test_command_line_models():
    fleet = fleet_from_args(["smollm2", "/models/x"], {"max_model_len": 512}, ["a", "b"], "5m")
    assert [m.name for m in fleet.models] == ["a", "b"] and fleet.keep_alive == 300
    assert fleet.models[1].engine == {"max_model_len": 512}
    with pytest.raises(ConfigError, match="2 models"):
        fleet_from_args(["a", "b"], {}, ["only-one"])


def test_the_example_models_file_reads():
    from pathlib import Path

    from pagoda.fleet.spec import fleet_from_yaml
    fleet = fleet_from_yaml(str(Path(__file__).parents[2] / "examples" / "models.yaml"))
    smol, gemma = fleet.models
    assert (smol.name, smol.pinned, smol.names) == ("smollm2", True, ["smollm2", "gpt-4o-mini"])
    assert (gemma.name, gemma.keep_alive, gemma.priority) == ("gemma", 300, 5)
    assert gemma.engine["max_num_seqs"] == 8 and fleet.memory_limit == 6 << 30
