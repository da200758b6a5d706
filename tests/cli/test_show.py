"""`pagoda show`: a pulled model's architecture, size, context and template, read from its
config and headers."""

from __future__ import annotations

import json

from pagoda.cli.main import main


def test_show_summarises_a_pulled_model(smollm2_dir, capsys):
    assert main(["show", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert "architecture      LlamaForCausalLM" in out
    assert "context length    8192" in out and "30, 9 heads (3 KV), head dim 64" in out
    assert "<|im_start|>" in out  # the template's first lines


def test_show_json_and_template(smollm2_dir, capsys):
    assert main(["show", str(smollm2_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] > 100e6 and summary["size_bytes"] > 50e6
    assert summary["chat_template"] is True and summary["vocab_size"] == 49152
    assert main(["show", str(smollm2_dir), "--template"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("{% endif %}")
    assert main(["show", str(smollm2_dir), "--config"]) == 0
    assert json.loads(capsys.readouterr().out)["num_hidden_layers"] == 30


def test_show_unknown_model_is_one_line(capsys):
    assert main(["show", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pagoda show: model 'no-such-model' not found") and err.count("\n") == 1
