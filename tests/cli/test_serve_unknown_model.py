"""`pagoda serve` on a checkpoint of an unknown architecture: one clear line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys


def test_serve_names_the_architecture_and_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "pagoda.cli.main", "serve", str(tmp_path),
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pagoda serve:")]
    assert lines == ["pagoda serve: model architecture 'MambaForCausalLM' is not supported "
                     "(supported: Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, "
                     "MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                     "Qwen3MoeForCausalLM)"]
