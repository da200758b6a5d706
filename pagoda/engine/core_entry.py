"""The engine process's entry point, importable without the engine itself: the frontend
names it as the spawn target, and only the child pays for importing models and kernels."""

from __future__ import annotations

from pagoda.process import StartupPhases


def spawn_main(config_frame: bytes, input_addr: str, output_addr: str, parent_pid: int,
               spawned_at: float) -> None:
    phases = StartupPhases(spawned_at)
    phases.mark("process start")
    from pagoda.engine.core_proc import spawn_main as main
    phases.mark("imports")
    main(config_frame, input_addr, output_addr, parent_pid, phases)
