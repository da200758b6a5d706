"""`pagoda bench fleet` end to end on CPU with two tiny models: each alone, both busy, the
ratio between them, and an engine's sleep/wake with unchanged outputs."""

from __future__ import annotations

import json

from pagoda.cli.main import main
from tests.utils import free_port, tiny_chat_model


def test_fleet_benchmark_runs_and_reports(tmp_path, smollm2_dir, capsys):
    tiny = tiny_chat_model(tmp_path / "tiny", smollm2_dir)
    out = tmp_path / "fleet.json"
    assert main(["bench", "fleet", "--model", f"a={tiny}", "--model", f"b={tiny}",
                 "--wake", f"a={tiny}", "--wake-repeats", "2", "--dtype", "float32",
                 "--max-model-len", "256", "--max-num-seqs", "8", "--num-prompts", "6",
                 "--max-concurrency", "3", "--input-len", "16", "--output-len", "8",
                 "--port", str(free_port()), "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    sharing = result["sharing"]
    for name in "ab":
        for phase in ("alone", "together"):
            assert sharing[phase][name]["completed"] == 6 and sharing[phase][name]["failed"] == 0
        ratio = sharing["together"][name]["output_throughput"] / \
            sharing["alone"][name]["output_throughput"]
        assert sharing["together_over_alone"][name] == ratio
    assert {m["model"] for m in sharing["plan"]["devices"][0]["models"]} == {"a", "b"}
    (wake,) = result["wake"]
    assert len(wake["wake_seconds"]) == 2 and wake["outputs_equal_after_wake"]
    assert out.with_suffix(".server.log").exists()
    assert "a: alone" in capsys.readouterr().out
