"""The reliability suite: fuzz, soak, faults and swaps against servers it starts, with a short
profile (make test) and a full one (the benchmark); prints the figures and writes them as JSON."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagoda.bench.reliability import faults
from pagoda.bench.reliability.load import Mix
from pagoda.bench.reliability.server import ServerProcess

PHASES = ("fuzz", "soak", "faults", "swaps")


@dataclass(frozen=True, slots=True)
class Profile:
    """How much of each phase to run."""

    fuzz_cases_per_route: int  # per operation and per mode (conforming, violating)
    generation_cases: int  # conforming completion + chat bodies steered to generate
    soak_s: float
    overload: float  # load as a multiple of the engine's max_num_seqs
    stop_s: float  # how long the engine stays SIGSTOPped
    fault_workers: int
    warmup_s: float
    swap_s: float
    swap_phase_s: float
    max_tokens: tuple[int, int]
    stall_timeout: float | None  # the stopped-engine server's --engine-stall-timeout


PROFILES = {
    "short": Profile(fuzz_cases_per_route=3, generation_cases=16, soak_s=6, overload=2.0,
                     stop_s=3.5, fault_workers=4, warmup_s=1.0, swap_s=5, swap_phase_s=2,
                     max_tokens=(4, 24), stall_timeout=1.5),
    "full": Profile(fuzz_cases_per_route=70, generation_cases=1200, soak_s=600, overload=2.0,
                    stop_s=15, fault_workers=16, warmup_s=5.0, swap_s=120, swap_phase_s=10,
                    max_tokens=(16, 128), stall_timeout=None),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model name or path to serve")
    p.add_argument("--served-model-name", default="model")
    p.add_argument("--profile", choices=sorted(PROFILES), default="short")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--max-num-seqs", type=int, default=16,
                   help="the servers' --max-num-seqs: the capacity the soak overloads")
    p.add_argument("--server-args", default="",
                   help="more `pagoda serve` flags for every server, one quoted string "
                        "(e.g. \"--load-format dummy --tokenizer DIR --dtype bfloat16\")")
    p.add_argument("--soak-seconds", type=float, default=None, help="override the profile's")
    p.add_argument("--soak-max-queue-wait", type=float, default=None,
                   help="the soak server's --max-queue-wait (default: the server's default)")
    p.add_argument("--soak-client-processes", type=int, default=None,
                   help="processes the soak's clients run in (default: one per 64 workers)")
    p.add_argument("--fuzz-cases-per-route", type=int, default=None)
    p.add_argument("--generation-cases", type=int, default=None)
    p.add_argument("--swap-memory-limit", default=None,
                   help="memory limit of the two-model swap server (default: room for one "
                        "model, from the server's own plan)")
    p.add_argument("--label", default=None, help="device label for the result file name")
    p.add_argument("--output-json", default=None,
                   help="where to write the figures (default bench/results/"
                        "LABEL-reliability-MODEL-COMMIT.json)")
    p.add_argument("--log-dir", default=None, help="where the servers' logs go (default: tmp)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    profile = _profile(args)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        print(f"bench reliability: unknown phases {sorted(unknown)}; known: {PHASES}")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so atexit stops the servers
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="pagoda-reliability-"))
    logs.mkdir(parents=True, exist_ok=True)
    suite = Suite(args, profile, logs)
    commit = _commit()  # the code this run imported, before anything else is committed
    started = time.monotonic()
    figures: dict[str, Any] = {}
    for phase in phases:
        print(f"== {phase}", flush=True)
        figures[phase] = getattr(suite, phase)()
        print(json.dumps(figures[phase], indent=1, default=str), flush=True)
    report = {"suite": "reliability", "profile": args.profile, "model": args.model,
              "commit": commit, "command": "pagoda " + shlex.join(sys.argv[1:]),
              "server_args": suite.base_args(), "wall_s": round(time.monotonic() - started, 1),
              "verdict": verdict(figures), **figures}
    path = _output_path(args, report["commit"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"verdict: {json.dumps(report['verdict'])}\nwritten to {path} (server logs in {logs})")
    return 0 if all(report["verdict"].values()) else 1


class Suite:
    """Each phase starts the servers it needs and stops them."""

    def __init__(self, args: argparse.Namespace, profile: Profile, logs: Path) -> None:
        self.args = args
        self.profile = profile
        self.logs = logs
        self.mix = Mix(args.served_model_name, max_tokens=profile.max_tokens)

    def base_args(self) -> list[str]:
        return ["--max-num-seqs", str(self.args.max_num_seqs),
                *shlex.split(self.args.server_args)]

    def _server(self, name: str, extra: tuple[str, ...] = ()) -> ServerProcess:
        return ServerProcess([self.args.model], ["--served-model-name",
                                                 self.args.served_model_name,
                                                 *self.base_args(), *extra],
                             self.logs / f"{name}.log")

    def fuzz(self) -> dict[str, Any]:
        from pagoda.bench.reliability.fuzz import Fuzzer
        server = self._server("fuzz")
        try:
            fuzzer = Fuzzer(server.url, self.args.served_model_name, seed=self.args.seed)
            started = time.monotonic()
            result = fuzzer.run(self.profile.fuzz_cases_per_route,
                                self.profile.generation_cases)
            figures = {"routes": sorted({f"{o.method.upper()} {o.path}"
                                         for o in fuzzer.operations()}),
                       **result.to_json(), "wall_s": round(time.monotonic() - started, 1),
                       "residue_after": server.wait_idle(),
                       "health_after": server.status()}
        finally:
            figures_exit = server.stop()
        figures["exit_code"] = figures_exit
        return figures

    def soak(self) -> dict[str, Any]:
        from pagoda.bench.reliability.soak import soak
        wait = self.args.soak_max_queue_wait
        server = self._server("soak", () if wait is None else ("--max-queue-wait", str(wait)))
        try:
            return soak(server, self.mix, self.args.max_num_seqs, self.profile.overload,
                        self.profile.soak_s, self.args.seed, self.args.soak_client_processes)
        finally:
            server.stop()

    def faults(self) -> dict[str, Any]:
        p = self.profile
        out: dict[str, Any] = {}
        server = self._server("fault-engine-kill")
        out["engine_kill"] = faults.engine_kill(server, self.mix, p.fault_workers, p.warmup_s)
        server.stop()
        stall = () if p.stall_timeout is None else ("--engine-stall-timeout",
                                                    str(p.stall_timeout))
        server = self._server("fault-engine-stop", stall)
        try:
            out["engine_stop"] = faults.engine_stop(server, self.mix, p.fault_workers,
                                                    p.warmup_s, p.stop_s)
        finally:
            server.stop()
        server = self._server("fault-server-term", ("--shutdown-timeout", "5"))
        out["server_term"] = faults.server_term(server, self.mix, p.fault_workers, p.warmup_s)
        server.stop()
        return out

    def swaps(self) -> dict[str, Any]:
        from pagoda.bench.reliability.swaps import swaps
        names = ["model-a", "model-b"]
        limit = self.args.swap_memory_limit or self._room_for_one(names)
        server = ServerProcess([self.args.model, self.args.model],
                               ["--served-model-name", *names, *self.base_args(),
                                "--memory-limit", str(limit)], self.logs / "swaps.log")
        try:
            figures = swaps(server, self.mix, names, max(2, self.profile.fault_workers),
                            self.profile.swap_s, self.profile.swap_phase_s)
        finally:
            code = server.stop()
        return {"memory_limit": limit, **figures, "exit_code": code}

    def _room_for_one(self, names: list[str]) -> int:
        """A limit that holds one of the two models, from a plan with no limit."""
        probe = ServerProcess([self.args.model, self.args.model],
                              ["--served-model-name", *names, *self.base_args()],
                              self.logs / "swaps-probe.log")
        try:
            plan = probe.get("/pagoda/plan")["devices"][0]
        finally:
            probe.stop()
        fixed = max(m["weight_bytes"] + m["activation_bytes"] + m["overhead_bytes"]
                    for m in plan["models"])
        return int(fixed * 1.5)  # one model and its KV cache; not two


def verdict(figures: dict[str, Any]) -> dict[str, bool]:
    """The targets: no 5xx in fuzzing, nothing lost or leaked, every shed with Retry-After."""
    checks: dict[str, bool] = {}
    if "fuzz" in figures:
        f = figures["fuzz"]
        checks["fuzz_no_5xx"] = f["server_5xx"] == 0 and f["hangs"] == 0
    if "soak" in figures:
        s = figures["soak"]
        checks["soak_nothing_lost"] = s["lost_total"] == 0 and s["server_5xx"] == 0
        checks["soak_every_shed_has_retry_after"] = s["shed_without_retry_after"] == 0
        checks["soak_nothing_leaked"] = not s["leaked"]
    if "faults" in figures:
        f = figures["faults"]
        checks["engine_kill_exits_nonzero"] = (f["engine_kill"]["to_exit_s"] is not None
                                               and f["engine_kill"]["exit_code"] != 0)
        checks["engine_kill_nothing_lost"] = f["engine_kill"]["lost"] == 0
        checks["engine_stop_turns_unhealthy"] = f["engine_stop"]["to_unhealthy_s"] is not None
        checks["engine_stop_nothing_lost"] = f["engine_stop"]["lost"] == 0
        checks["server_term_exits"] = f["server_term"]["exit_code"] == 0
        checks["server_term_nothing_lost"] = f["server_term"]["lost"] == 0
    if "swaps" in figures:
        w = figures["swaps"]
        checks["swaps_nothing_lost"] = w["lost_total"] == 0 and w["server_5xx"] == 0
        checks["swaps_none_half_loaded"] = not w["half_loaded"] and w["in_flight_after"] == 0
    return checks


def _profile(args: argparse.Namespace) -> Profile:
    from dataclasses import replace
    profile = PROFILES[args.profile]
    if args.soak_seconds is not None:
        profile = replace(profile, soak_s=args.soak_seconds)
    if args.fuzz_cases_per_route is not None:
        profile = replace(profile, fuzz_cases_per_route=args.fuzz_cases_per_route)
    if args.generation_cases is not None:
        profile = replace(profile, generation_cases=args.generation_cases)
    return profile


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _output_path(args: argparse.Namespace, commit: str) -> Path:
    if args.output_json:
        return Path(args.output_json)
    label = args.label or _device_label()
    model = Path(args.model).name or args.model
    return Path("bench/results") / f"{label}-reliability-{model}-{commit}.json"


def _device_label() -> str:
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"
