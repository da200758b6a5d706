"""Garbage-collector settings and startup timing for long-running processes."""

from __future__ import annotations

import gc
import subprocess
import sys
import time

import pytest

from pagoda.process import StartupPhases, existing_objects_frozen


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
            "freeze_startup_objects(); print(gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert int(out.stdout) > 1000


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


def test_the_frontend_spawns_the_engine_without_importing_torch():
    """Everything `pagoda serve` imports before it spawns the engine: torch and transformers
    would delay the engine's start by seconds on a cold machine."""
    code = ("import sys; from pagoda.config import engine_config; "
            "from pagoda.engine.client import start_in_background; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
