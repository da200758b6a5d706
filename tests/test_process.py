"""Garbage-collector settings and startup timing for long-running processes."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time

import pytest

from pagoda.process import YOUNG_GC_THRESHOLD, StartupPhases, existing_objects_frozen


def test_objects_are_frozen_inside_the_block_and_released_after():
    assert gc.get_freeze_count() == 0
    with existing_objects_frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_an_existing_freeze_is_left_alone():
    gc.freeze()
    try:
        with existing_objects_frozen():
            pass
        # Still frozen after the block (an unfreeze empties the permanent generation). The
        # count itself may drop meanwhile: frozen objects freed by refcount leave it.
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_freeze_startup_objects_freezes_for_good():
    code = ("import gc; from pagoda.process import freeze_startup_objects; "
            "freeze_startup_objects(); print(gc.get_freeze_count(), gc.get_threshold()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    frozen, young_threshold = map(int, out.stdout.split())
    assert frozen > 1000
    assert young_threshold == YOUNG_GC_THRESHOLD


def test_llm_generate_steps_with_existing_objects_frozen(smollm2_llm, monkeypatch):
    from pagoda import SamplingParams
    counts = []
    real_step = smollm2_llm.engine.step

    def step(*args, **kwargs):
        counts.append(gc.get_freeze_count())
        return real_step(*args, **kwargs)
    monkeypatch.setattr(smollm2_llm.engine, "step", step)
    smollm2_llm.generate("Hello", SamplingParams(max_tokens=2, temperature=0))
    assert counts and all(count > 0 for count in counts)
    assert gc.get_freeze_count() == 0


def test_startup_phases_time_each_phase_from_the_previous_mark():
    phases = StartupPhases(start=time.time() - 2.0)  # started two seconds ago elsewhere
    phases.mark("process start")
    time.sleep(0.05)
    phases.mark("imports")
    (first, before), (second, imports) = phases.phases
    assert (first, second) == ("process start", "imports")
    assert 1.9 < before < 5 and 0.04 < imports < 5  # generous: a loaded machine oversleeps
    assert phases.total == pytest.approx(before + imports)
    assert phases.summary() == f"{phases.total:.1f}s (process start {before:.1f}s, " \
        f"imports {imports:.1f}s)"


def imported_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter has imported after running `code`."""
    code += ("\nimport json, sys\n"
             f"print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_frontend_spawns_the_engine_without_importing_torch():
    """Everything `pagoda serve` imports before it spawns the engine: torch and transformers
    would delay the engine's start by seconds on a cold machine."""
    code = ("from pagoda.config import engine_config\n"
            "from pagoda.engine.client import start_in_background")
    assert imported_after(code, ("torch", "transformers")) == []


def test_the_engine_starts_without_importing_transformers(tmp_path):
    """transformers' config classes take 6-9 s to import on a GPU host: the engine process
    reads config.json itself (pagoda.models.hf_config)."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}))
    code = ("from pagoda.engine.core_proc import spawn_main\n"
            "from pagoda.config import engine_config\n"
            "from pagoda.engine.core import EngineCore\n"
            f"core = EngineCore(engine_config({str(tmp_path)!r}, load_format='dummy', "
            "kv_cache_memory=4 << 20))\n"
            "assert core.model_info.vocab_size == 300")
    assert imported_after(code, ("torch", "transformers")) == ["torch"]


def test_the_frontend_loads_a_tokenizer_without_torch(smollm2_dir):
    """`pagoda serve smollm2` resolves the model and loads its tokenizer while the engine
    starts: neither needs torch nor transformers' config classes."""
    code = ("from pagoda.entrypoints.openai.server import serve\n"
            "from pagoda.models.source import resolve_model\n"
            "from pagoda.models.loader.tokenizer import get_tokenizer\n"
            "assert get_tokenizer(resolve_model('smollm2')).eos_token is not None")
    assert imported_after(code, ("torch", "transformers.configuration_utils")) == []
