"""Model swaps under load: a several-model server with room for one model awake, load that
moves between the models; no request may be lost and no model left half-loaded."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from typing import Any

from pagoda.bench.reliability.load import LoadResult, Mix, run_load
from pagoda.bench.reliability.server import ServerProcess

SETTLED = {"loaded", "sleeping", "unloaded"}


async def _alternate(server: ServerProcess, mix: Mix, names: list[str], workers: int,
                     duration: float, phase: float) -> LoadResult:
    """Load on one model at a time, switching every `phase` s; the phases overlap a little
    (the old one's requests still run when the next one's start), which forces swaps."""
    merged = LoadResult()
    deadline = time.monotonic() + duration
    index = 0
    while time.monotonic() < deadline:
        name = names[index % len(names)]
        part = await run_load(server.url, replace(mix, model=name), workers,
                              min(phase, max(0.5, deadline - time.monotonic())), seed=index)
        merged.outcomes.extend(part.outcomes)
        index += 1
    merged.stopped = time.monotonic()
    return merged


def swaps(server: ServerProcess, mix: Mix, names: list[str], workers: int, duration: float,
          phase: float) -> dict[str, Any]:
    watcher = StateWatcher(server)
    watcher.start()
    try:
        result = asyncio.run(_alternate(server, mix, names, workers, duration, phase))
    finally:
        watcher.stop()
    residue = server.wait_idle()
    time.sleep(1.0)
    rows = server.get("/pagoda/ps")["models"]
    counts = result.counts()
    return {
        "models": names, "workers": workers, "phase_s": phase,
        "duration_s": round(result.stopped - result.started, 1), **counts,
        "lost_total": counts["lost"] + counts["error_event"] + counts["aborted"],
        "transitions_seen": watcher.transitions,
        "states_after": {f"{r['model']}#{r['replica']}": r["state"] for r in rows},
        "half_loaded": [r["model"] for r in rows if r["state"] not in SETTLED],
        "in_flight_after": sum(r.get("in_flight") or 0 for r in rows),
        "residue_after": residue, "samples": result.samples(),
    }


class StateWatcher:
    """Polls /pagoda/ps in a thread and counts each model's state changes (loads, sleeps,
    wakes) while the load runs."""

    def __init__(self, server: ServerProcess, every: float = 0.2) -> None:
        self.server = server
        self.every = every
        self.transitions: dict[str, int] = {}
        self._last: dict[str, str] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._done.wait(self.every):
            try:
                rows = self.server.get("/pagoda/ps", timeout=5)["models"]
            except Exception:  # noqa: BLE001 -- a missed poll only misses a transition
                continue
            for row in rows:
                model, state = row["model"], row["state"]
                if self._last.get(model, state) != state:
                    key = f"{model}: -> {state}"
                    self.transitions[key] = self.transitions.get(key, 0) + 1
                self._last[model] = state
