"""The default matrix against its floor: end-to-end wall time, the floor's two parts, the ratio.

Run from the project root (with the Makefile's bytecode settings)::

    .venv/bin/python bench/bench_matrix.py                   # 5 cold starts, 3 default matrices
    .venv/bin/python bench/bench_matrix.py --compare-n       # also -n 0 and -n 2, with Amdahl
    .venv/bin/python bench/bench_matrix.py --skip-matrix     # cold start only
    .venv/bin/python bench/bench_matrix.py --skip-matrix --services docker   # in containers

The floor is what one run of the default matrix cannot avoid, measured in the same bench run:

- a stack cold start: ``ServiceStack("local")`` start (Postgres from the template cache, Redis,
  the session database), alembic ``upgrade head``, a ``MarketplaceServer``, and one
  ``CeleryWorkerProcess(pool="solo")`` answering a control ping; one untimed warm-up start
  first pays this process's imports; the median of ``--starts`` timed starts;
- the scenarios' own durations: the sum of every test's ``run_durations_ms`` in the run's JSON
  report (the median over the runs).

The wall time is the whole ``python -m harness matrix`` command with its default ``-n``, exit to
exit, its own services started and stopped; the median of ``--matrix-runs``.

Targets (issue 14, this 2-core machine, idle): wall <= 3 s, wall / floor <= 1.7, per-scenario
median <= 40 ms, cold start <= 1.5 s (docker: 2.5 s). Exits 1 if one is missed, 2 if a matrix
run failed. Other sessions load this machine too: the load average is printed around each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

# Allow `python bench/bench_matrix.py` from a checkout (the service is not an installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.migrations import upgrade
from harness.services import ServiceMode, ServiceStack
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess, app_env

PHASES = ("services", "migrations", "marketplace", "worker")
TARGET_COLD_S = {"local": 1.5, "docker": 2.5}
TARGET_SCENARIO_MS = 40.0
TARGET_WALL_S = 3.0
TARGET_RATIO = 1.7
ROOT = Path(__file__).resolve().parents[1]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class ColdStart(NamedTuple):
    phases: dict[str, float]  # seconds per phase
    worker_stop_s: float
    stack_stop_s: float

    @property
    def total(self) -> float:
        return sum(self.phases.values())


def cold_start(workdir: Path, env: dict[str, str], mode: ServiceMode) -> ColdStart:
    """One start of the whole stack, phase by phase; everything is stopped again."""
    stack = ServiceStack(mode, env=env)
    phases: dict[str, float] = {}
    worker: CeleryWorkerProcess | None = None
    marketplace = MarketplaceServer()
    worker_stop = stack_stop = 0.0
    try:
        t0 = time.perf_counter()
        services = stack.start()
        phases["services"] = time.perf_counter() - t0
        phases["migrations"] = _timed(lambda: upgrade(services.postgres_url))
        phases["marketplace"] = _timed(marketplace.start)
        worker = CeleryWorkerProcess(
            env=app_env(
                database_url=services.postgres_url,
                broker_url=services.redis_url,
                marketplace_url=marketplace.url,
            ),
            log_dir=workdir,
            pool="solo",
        )
        phases["worker"] = _timed(worker.start)
    finally:
        if worker is not None:
            worker_stop = _timed(worker.stop)
        marketplace.stop()
        stack_stop = _timed(stack.stop)
    return ColdStart(phases, worker_stop, stack_stop)


def bench_cold_start(runs: int, fresh_template: bool, mode: ServiceMode) -> list[ColdStart]:
    with tempfile.TemporaryDirectory(prefix="bench-matrix-") as tmp:
        root = Path(tmp)
        env = dict(os.environ)

        def env_for(i: int) -> dict[str, str]:
            return {**env, "XDG_CACHE_HOME": str(root / f"cache-{i}")} if fresh_template else env

        print(f"load before cold start: {load()}")
        warm = cold_start(root, env_for(-1), mode)
        print(f"  warm-up (untimed, pays imports): {warm.total * 1000:.0f} ms")
        results = [cold_start(root, env_for(i), mode) for i in range(runs)]
        print(f"load after cold start:  {load()}")
    return results


class MatrixRun(NamedTuple):
    workers: str
    wall_s: float
    exit_code: int
    report: dict[str, Any]


def run_matrix(workers: str | None, report: Path, extra: Sequence[str]) -> MatrixRun:
    """``harness matrix`` end to end, exit to exit; ``workers`` None: its default ``-n``."""
    cmd = [sys.executable, "-m", "harness", "matrix", "--report", str(report)]
    cmd += ["-n", workers] if workers is not None else []
    cmd += extra
    label = f"-n {workers}" if workers is not None else "(default -n)"
    print(f"load before `harness matrix {label}`: {load()}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    print(f"load after  `harness matrix {label}`: {load()}   ({wall:.1f} s, rc {proc.returncode})")
    if proc.returncode != 0:
        print("\n".join(proc.stdout.splitlines()[-15:]))
        print("\n".join(proc.stderr.splitlines()[-15:]), file=sys.stderr)
    data: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}
    return MatrixRun(workers or "default", wall, proc.returncode, data)


def run_durations(report: dict[str, Any]) -> list[float]:
    runs = [float(ms) for t in report.get("tests", []) for ms in t.get("run_durations_ms", [])]
    if runs:
        return runs
    return [float(c["median_run_ms"]) for c in report.get("cells", []) if c.get("median_run_ms")]


class Bound(NamedTuple):
    """Amdahl's law on a ``-n 0`` run: how much two xdist workers could gain at best."""

    scenarios: int
    typical_s: float  # median test duration (setup + call + teardown)
    parallel_s: float  # the scenarios' own time: what xdist workers can split
    fixed_s: float  # the rest of the wall time: paid once per run, whatever -n is

    @property
    def best_speedup_n2(self) -> float:
        """-n 0 / -n 2 if xdist itself cost nothing (it costs a second interpreter at least)."""
        return (self.fixed_s + self.parallel_s) / (self.fixed_s + self.parallel_s / 2)

    def scenarios_for(self, speedup: float) -> int:
        """How many scenarios of this typical length the target speedup would need."""
        # (F + W) / (F + W/2) >= s  <=>  W >= F (s - 1) / (1 - s/2), for s < 2.
        return int(self.fixed_s * (speedup - 1) / (1 - speedup / 2) / self.typical_s) + 1


def amdahl(report: dict[str, Any], wall_s: float) -> Bound | None:
    """The bound from a ``-n 0`` report: its first and last tests also carry the session's
    set-up and teardown, so the scenarios' own share is their count x the median test."""
    durations = [float(t["duration_s"]) for t in report.get("tests", []) if "duration_s" in t]
    if not durations:
        return None
    typical = statistics.median(durations)
    parallel = typical * len(durations)
    return Bound(len(durations), typical, parallel, wall_s - parallel)


def celery_workers(report: dict[str, Any]) -> int:
    """Celery worker processes that served the run's scenarios (one per pool and broker)."""
    return len({t["celery_worker"] for t in report.get("tests", []) if t.get("celery_worker")})


def _ms(samples: Sequence[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"median {statistics.median(ms):7.1f} ms  (min {ms[0]:7.1f}, max {ms[-1]:7.1f})"


Row = tuple[str, str, str, bool]


def floor_report(starts: Sequence[ColdStart], runs: Sequence[MatrixRun]) -> list[Row]:
    """The default matrix against its floor, from the same bench run: what one run cannot avoid
    is a stack cold start (median of the timed starts) plus the scenarios' own run durations
    (the sum of every test's ``run_durations_ms`` in the run's report)."""
    cold = statistics.median(s.total for s in starts)
    walls = [run.wall_s for run in runs]
    wall = statistics.median(walls)
    work = statistics.median(sum(run_durations(run.report)) / 1000 for run in runs)
    floor = cold + work
    ratio = wall / floor
    durations = [ms for run in runs for ms in run_durations(run.report)]
    scen = statistics.median(durations) if durations else float("nan")
    print(
        f"default matrix: wall {wall:.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls)}); "
        f"floor {floor:.2f} s = cold start {cold:.2f} s + scenarios {work:.2f} s "
        f"({len(durations) // max(len(runs), 1)} runs x median {scen:.0f} ms); "
        f"ratio {ratio:.2f}"
    )
    return [
        ("matrix wall", f"{wall:.2f} s", f"<= {TARGET_WALL_S} s", wall <= TARGET_WALL_S),
        ("- floor: cold start", f"{cold:.2f} s", "", True),
        ("- floor: scenarios", f"{work:.2f} s", "", True),
        ("ratio wall/floor", f"{ratio:.2f}", f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO),
        ("per-scenario median", f"{scen:.0f} ms", f"<= {TARGET_SCENARIO_MS:.0f} ms",
         scen <= TARGET_SCENARIO_MS),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--starts", type=int, default=5, help="timed cold starts")
    parser.add_argument("--matrix-runs", type=int, default=3, help="runs of the default matrix")
    parser.add_argument("--fresh-template", action="store_true", help="initdb on every start")
    parser.add_argument("--skip-matrix", action="store_true")
    parser.add_argument(
        "--compare-n", action="store_true", help="also run the matrix with -n 0 and -n 2"
    )
    parser.add_argument(
        "--services", choices=("local", "docker"), default="local", help="the cold start's backend"
    )
    parser.add_argument("matrix_args", nargs="*", help="after --: passed to `harness matrix`")
    args = parser.parse_args(argv)

    print(
        f"Python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs; "
        "other sessions may load this machine (see the load averages, 1/5/15 min)"
    )
    starts = bench_cold_start(args.starts, args.fresh_template, args.services)
    print(
        f"cold start on {args.services}, {len(starts)} runs (services, migrations, marketplace, "
        "worker ping):"
    )
    print(f"  {'total':<22} {_ms([s.total for s in starts])}")
    for phase in PHASES:
        print(f"  {phase:<22} {_ms([s.phases[phase] for s in starts])}")
    print(f"  {'(worker stop)':<22} {_ms([s.worker_stop_s for s in starts])}")
    print(f"  {'(stack stop)':<22} {_ms([s.stack_stop_s for s in starts])}")

    rows: list[Row] = []
    cold = statistics.median(s.total for s in starts)
    target = TARGET_COLD_S[args.services]
    rows.append((f"cold start {args.services}", f"{cold:.2f} s", f"<= {target} s", cold <= target))
    failed = False
    if not args.skip_matrix:
        with tempfile.TemporaryDirectory(prefix="bench-matrix-") as tmp:
            runs = []
            for i in range(args.matrix_runs):
                run = run_matrix(None, Path(tmp) / f"default-{i}.json", args.matrix_args)
                failed = failed or run.exit_code != 0
                runs.append(run)
            rows += floor_report(starts, runs)
            if args.compare_n:
                walls: dict[str, float] = {}
                for workers in ("0", "2"):
                    run = run_matrix(workers, Path(tmp) / f"n{workers}.json", args.matrix_args)
                    failed = failed or run.exit_code != 0
                    walls[workers] = run.wall_s
                    bound = amdahl(run.report, run.wall_s) if workers == "0" else None
                    if bound is not None:
                        print(
                            f"Amdahl on -n 0: {bound.scenarios} scenarios x "
                            f"{bound.typical_s * 1000:.0f} ms = {bound.parallel_s:.1f} s that "
                            f"xdist can split; {bound.fixed_s:.1f} s paid once per run; best "
                            f"-n 2 speedup {bound.best_speedup_n2:.2f}x"
                        )
                rows.append(("matrix -n 0 wall", f"{walls['0']:.2f} s", "(not gated)", True))
                rows.append(("matrix -n 2 wall", f"{walls['2']:.2f} s", "(not gated)", True))

    print(f"{'measure':<22} {'value':>10} {'target':>12}  result")
    for name, value, target_text, ok in rows:
        verdict = "ok" if ok else "MISSED"
        print(f"{name:<22} {value:>10} {target_text:>12}  {verdict if target_text else ''}")
    print(f"load at the end: {load()}")
    if failed:
        print("a matrix run did not pass (exit code != 0): its timings are suspect")
        return 2
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
