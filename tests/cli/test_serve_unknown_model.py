"""`pagoda serve` refusing a checkpoint at startup (an unknown architecture, a --quantization
it does not hold): one clear line, no traceback."""

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


def test_serve_with_a_quantization_the_checkpoint_lacks_stops_in_one_line(smollm2_dir):
    proc = subprocess.run([sys.executable, "-m", "pagoda.cli.main", "serve", str(smollm2_dir),
                           "--port", "0", "--quantization", "awq"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pagoda serve:")]
    assert len(lines) == 1 and "--quantization awq does not match" in lines[0]
    assert "holds gguf-quantized weights" in lines[0]
