"""Modelfiles read into models-file entries, and `pagoda create` writing them."""

from __future__ import annotations

import pytest
import yaml

from pagoda.cli.main import main
from pagoda.errors import ConfigError
from pagoda.fleet.modelfile import parse_modelfile
from pagoda.fleet.spec import fleet_from_yaml

MODELFILE = '''# comment
FROM smollm2
SYSTEM """You are a pirate.
Answer like one."""
PARAMETER temperature 0.3
PARAMETER stop "<|im_end|>"
PARAMETER stop Arr
PARAMETER num_ctx 1024
PARAMETER seed 42
TEMPLATE """{{ range .Messages }}{{ .Role }}: {{ .Content }}
{{ end }}assistant:"""
LICENSE MIT
'''


def test_instructions_become_an_entry():
    entry = parse_modelfile(MODELFILE)
    assert entry["model"] == "smollm2"
    assert entry["system"] == "You are a pirate.\nAnswer like one."
    assert entry["parameters"] == {"temperature": 0.3, "stop": ["<|im_end|>", "Arr"], "seed": 42}
    assert entry["max_model_len"] == 1024
    assert entry["template"].startswith("{{ range .Messages }}")


@pytest.mark.parametrize("text, says", [
    ("SYSTEM hi\n", "no FROM"),
    ("FROM x\nPARAMETER mirostat 1\n", "mirostat is not supported"),
    ("FROM x\nPARAMETER temperature hot\n", "must be a number"),
    ("FROM x\nPARAMETER temperature 9\n", "temperature must be"),
    ("FROM x\nADAPTER ./lora\n", "--lora-modules"),
    ("FROM x\nTEMPLATE {{ .Tools }}\n", "TEMPLATE cannot be used"),
    ("FROM x\nFROBNICATE y\n", "unknown instruction FROBNICATE"),
])
def test_what_pagoda_cannot_honour_is_refused_clearly(text, says):
    with pytest.raises(ConfigError) as refused:
        parse_modelfile(text)
    assert says in str(refused.value)


def test_create_writes_an_entry_serve_reads(tmp_path, capsys):
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(MODELFILE)
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - {model: smollm2, name: smol}\n")
    assert main(["create", "pirate", "-f", str(modelfile), "--config", str(config)]) == 0
    assert "pagoda serve --config" in capsys.readouterr().out
    fleet = fleet_from_yaml(config)
    pirate = fleet.models[1]
    assert pirate.name == "pirate" and pirate.system.startswith("You are a pirate")
    assert pirate.parameters["stop"] == ["<|im_end|>", "Arr"]
    assert "for message in messages" in pirate.chat_template
    assert pirate.engine["max_model_len"] == 1024
    modelfile.write_text("FROM pirate\nPARAMETER temperature 0.9\n")
    assert main(["create", "parrot", "-f", str(modelfile), "--config", str(config)]) == 0
    parrot = yaml.safe_load(config.read_text())["models"][2]
    assert parrot["model"] == "smollm2" and parrot["system"].startswith("You are a pirate")
    assert parrot["parameters"]["temperature"] == 0.9 and parrot["parameters"]["seed"] == 42
    modelfile.write_text("FROM x\nPARAMETER mirostat 1\n")
    assert main(["create", "bad", "-f", str(modelfile), "--config", str(config)]) == 1
    assert "mirostat" in capsys.readouterr().err


def test_models_file_parameters_are_checked(tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - {model: smollm2, parameters: {top_p: 3}}\n")
    with pytest.raises(ConfigError, match="top_p"):
        fleet_from_yaml(config)
    config.write_text("models:\n  - {model: smollm2, template: x, chat_template: y}\n")
    with pytest.raises(ConfigError, match="not both"):
        fleet_from_yaml(config)
