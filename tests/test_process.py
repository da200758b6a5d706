"""Garbage-collector settings for long-running processes."""

from __future__ import annotations

import gc
import subprocess
import sys

from pagoda.process import existing_objects_frozen


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
