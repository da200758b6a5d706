"""Fault injection under load, each on a fresh server: the engine killed, the engine stopped
(SIGSTOP) and continued, the server sent SIGTERM. Times to the first error, to /health 503
and to the server's exit; what became of the requests in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from pagoda.bench.reliability.load import LoadResult, Mix, run_load
from pagoda.bench.reliability.server import ServerProcess

POLL_S = 0.05
# a request the server resets on arrival this close to its going away (no status, failed at
# once) met a server going away: it was refused, not lost (the race no server can close: a
# keep-alive connection the client reuses just as the server closes it). "At once" allows for
# a busy client machine's event loop; a request the server had taken runs far longer.
EXIT_RACE_S = 1.0
AT_ONCE_S = 0.5


async def _under_load(server: ServerProcess, mix: Mix, workers: int, warmup: float,
                      inject: Callable[[asyncio.Event], Any]) -> tuple[LoadResult, dict]:
    """Run load; after `warmup` s run `inject(stop)` in a thread; it sets `stop` to end it."""
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(server.url, mix, workers, 3600, stop=stop))
    await asyncio.sleep(warmup)
    loop = asyncio.get_running_loop()
    figures = await loop.run_in_executor(None, inject, lambda: loop.call_soon_threadsafe(stop.set))
    return await load, figures


def _wait_status(server: ServerProcess, want: Callable[[int | None], bool], since: float,
                 timeout: float) -> float | None:
    deadline = since + timeout
    while time.monotonic() < deadline:
        if want(server.status()):
            return round(time.monotonic() - since, 3)
        time.sleep(POLL_S)
    return None


def engine_kill(server: ServerProcess, mix: Mix, workers: int, warmup: float) -> dict[str, Any]:
    def inject(stop: Callable[[], None]) -> dict[str, Any]:
        t0 = time.monotonic()
        os.kill(server.engine_pid(), signal.SIGKILL)
        unhealthy = _wait_status(server, lambda s: s != 200, t0, 30)
        try:
            server.proc.wait(60)
            exited = round(time.monotonic() - t0, 3)
        except Exception:  # noqa: BLE001 -- reported as never exiting
            exited = None
        stop()
        return {"t0": t0, "to_unhealthy_s": unhealthy, "to_exit_s": exited,
                "exit_code": server.proc.returncode}
    result, figures = asyncio.run(_under_load(server, mix, workers, warmup, inject))
    _refused_at_exit(result, figures)
    return _report(result, figures, ("error_event", "server_5xx", "shed"))


def engine_stop(server: ServerProcess, mix: Mix, workers: int, warmup: float,
                stopped_for: float) -> dict[str, Any]:
    def inject(stop: Callable[[], None]) -> dict[str, Any]:
        pid = server.engine_pid()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        unhealthy = _wait_status(server, lambda s: s == 503, t0, stopped_for)
        live = server.status("/live")
        time.sleep(max(0.0, stopped_for - (time.monotonic() - t0)))
        t1 = time.monotonic()
        os.kill(pid, signal.SIGCONT)
        healthy = _wait_status(server, lambda s: s == 200, t1, 60)
        time.sleep(3)
        stop()
        return {"t0": t0, "stopped_s": stopped_for, "to_unhealthy_s": unhealthy,
                "live_while_stopped": live, "to_healthy_after_continue_s": healthy}
    result, figures = asyncio.run(_under_load(server, mix, workers, warmup, inject))
    report = _report(result, figures, ("error_event", "server_5xx"))
    report["residue_after"] = server.wait_idle()
    return report


def server_term(server: ServerProcess, mix: Mix, workers: int, warmup: float) -> dict[str, Any]:
    def inject(stop: Callable[[], None]) -> dict[str, Any]:
        t0 = time.monotonic()
        server.signal(signal.SIGTERM)
        unhealthy = _wait_status(server, lambda s: s != 200, t0, 30)
        try:
            server.proc.wait(120)
            exited = round(time.monotonic() - t0, 3)
        except Exception:  # noqa: BLE001 -- reported as never exiting
            exited = None
        stop()
        return {"t0": t0, "to_unhealthy_s": unhealthy, "to_exit_s": exited,
                "exit_code": server.proc.returncode}
    result, figures = asyncio.run(_under_load(server, mix, workers, warmup, inject))
    _refused_at_exit(result, figures)
    return _report(result, figures, ("aborted", "shed", "error_event"))


def _refused_at_exit(result: LoadResult, figures: dict[str, Any]) -> None:
    """Count as refused the lost requests that got no status and failed at once, from
    EXIT_RACE_S before the server went away: when it stopped listening (the first connection
    refused after the fault) or, failing that, at its exit (figures' t0 + to_exit_s). Its
    closing of idle connections comes with the first; on a busy machine the process may take
    seconds more to end."""
    if figures["to_exit_s"] is None:
        return
    t0 = figures["t0"]
    exited = t0 + figures["to_exit_s"]
    refused = [o.ended for o in result.outcomes if o.kind == "refused" and o.ended >= t0]
    gone = min([exited, *refused])
    for outcome in result.outcomes:
        if (outcome.kind == "lost" and outcome.status is None
                and outcome.ended >= gone - EXIT_RACE_S
                and outcome.ended - outcome.sent < AT_ONCE_S):
            outcome.kind = "refused"
            outcome.detail = "reset on arrival as the server exited: " + outcome.detail


def _report(result: LoadResult, figures: dict[str, Any], error_kinds: tuple[str, ...]
            ) -> dict[str, Any]:
    t0 = figures.pop("t0")
    counts = result.counts()
    return {**figures, "to_first_error_s": _round(result.first(error_kinds, t0)), **counts,
            "samples": result.samples()}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
