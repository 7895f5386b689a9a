"""Cost of ``run_async_safe`` next to a bare ``asyncio.run()``, measured side by side in one run.

Run from the project root::

    .venv/bin/python bench/bench_runner.py                # INFO line formatted + written (devnull)
    .venv/bin/python bench/bench_runner.py --log render   # INFO record built, nothing written
    .venv/bin/python bench/bench_runner.py --log off      # INFO disabled (default logging config)

Each round times a batch of calls of every variant back to back (order rotated per round). The
ratio of a variant is the median, over rounds, of its per-call time divided by the bare
``asyncio.run()`` time of the same round, so load from other processes that comes and goes
affects both sides of each ratio alike.

Targets: no-loop path <= 1.3x, thread path (called from inside a running loop) <= 3x.
Exits 1 if a target is missed, 2 if the paths were not the ones we meant to measure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

# Allow `python bench/bench_runner.py` from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.utils.asyncio_runner import run_async_safe

CONTEXT: dict[str, object] = {"run_id": 123, "job_code": "frontend_prices"}
BASELINE = "bare asyncio.run()"
NO_LOOP = "run_async_safe, no loop"
THREAD = "run_async_safe, running loop"
FLOOR = "reference: asyncio.run() in new thread"
TARGETS = {NO_LOOP: 1.3, THREAD: 3.0}


async def job() -> int:
    # One real trip through the loop, like the smallest useful job.
    await asyncio.sleep(0)
    return 1


Sample = tuple[float, float]  # (wall-clock, process CPU) microseconds per call


class _Clock:
    """Wall-clock and whole-process CPU time (all threads) over a batch of calls."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.wall = time.perf_counter_ns()
        self.cpu = time.process_time_ns()

    def per_call(self) -> Sample:
        wall = time.perf_counter_ns() - self.wall
        cpu = time.process_time_ns() - self.cpu
        return wall / self.calls / 1000, cpu / self.calls / 1000


def time_bare(calls: int) -> Sample:
    clock = _Clock(calls)
    for _ in range(calls):
        asyncio.run(job())
    return clock.per_call()


def time_no_loop(calls: int) -> Sample:
    clock = _Clock(calls)
    for _ in range(calls):
        run_async_safe(job(), context=CONTEXT)
    return clock.per_call()


def time_thread_path(calls: int) -> Sample:
    async def under_running_loop() -> Sample:
        # Timed inside, so the outer loop's own start-up is not charged to run_async_safe.
        clock = _Clock(calls)
        for _ in range(calls):
            run_async_safe(job(), context=CONTEXT)
        return clock.per_call()

    return asyncio.run(under_running_loop())


def time_thread_floor(calls: int) -> Sample:
    # What any fresh-thread-per-call design costs at least: start, run, join. Shown (not gated)
    # to separate run_async_safe's own overhead from the cost of the design the issue requires.
    def target() -> None:
        asyncio.run(job())

    clock = _Clock(calls)
    for _ in range(calls):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    return clock.per_call()


def check_paths() -> bool:
    """Make sure each variant really exercises the path it is named after."""

    async def where() -> str:
        return threading.current_thread().name

    async def from_loop() -> str:
        return run_async_safe(where())

    no_loop_thread = run_async_safe(where())
    thread_path_thread = asyncio.run(from_loop())
    ok = no_loop_thread == threading.current_thread().name and thread_path_thread.startswith(
        "run_async_safe-"
    )
    if not ok:
        print(
            f"unexpected paths: no-loop ran in {no_loop_thread!r}, thread path in "
            f"{thread_path_thread!r}"
        )
    return ok


class _RenderOnly(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        record.getMessage()


LOG_MODES = {
    "full": "INFO, formatted with asctime and written to devnull",
    "render": "INFO, record built and message rendered, nothing written",
    "off": "INFO disabled",
}


def configure_logging(mode: str) -> None:
    logger = logging.getLogger("app.utils.asyncio_runner")
    logger.propagate = False
    if mode == "off":
        logger.setLevel(logging.WARNING)
        return
    logger.setLevel(logging.INFO)
    if mode == "full":
        # What a worker logging at INFO pays, minus the destination's own latency.
        handler: logging.Handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler = _RenderOnly()
    logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=100, help="measured rounds per variant")
    parser.add_argument("--calls", type=int, default=50, help="calls per variant and round")
    parser.add_argument("--log", choices=sorted(LOG_MODES), default="full")
    args = parser.parse_args(argv)

    configure_logging(args.log)
    if not check_paths():
        return 2

    variants: dict[str, Callable[[int], Sample]] = {
        BASELINE: time_bare,
        NO_LOOP: time_no_loop,
        THREAD: time_thread_path,
        FLOOR: time_thread_floor,
    }
    for timer in variants.values():  # warm-up: imports, caches, first-thread costs
        timer(args.calls)

    samples: dict[str, list[Sample]] = {name: [] for name in variants}
    names = list(variants)
    for round_no in range(args.rounds):
        # Interleave and rotate the order so drift (thermal, noisy neighbours) hits all alike.
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            samples[name].append(variants[name](args.calls))

    def paired_ratio(name: str, which: int) -> float:
        pairs = zip(samples[name], samples[BASELINE], strict=True)
        return statistics.median(v[which] / b[which] for v, b in pairs)

    walls = {name: [s[0] for s in values] for name, values in samples.items()}
    cpus = {name: [s[1] for s in values] for name, values in samples.items()}

    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.platform()}, {os.cpu_count()} CPUs"
    )
    print(f"rounds={args.rounds} x calls={args.calls}; logging: {LOG_MODES[args.log]}")
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.2f}")
    if load > 0.75 * (os.cpu_count() or 1):
        # The thread path hands off between two threads per call; on a saturated machine it
        # waits for a free CPU each time, which the ratio would then mostly be measuring.
        print("WARNING: the machine is busy; the thread-path ratio is not representative")
    print(
        f"{'variant':<38} {'wall us/call':>12} {'p10':>7} {'p90':>7} {'ratio':>6} "
        f"{'cpu us/call':>11} {'ratio':>6} {'target':>7}  result (on the wall-clock ratio)"
    )
    missed = False
    for name, values in walls.items():
        deciles = statistics.quantiles(values, n=10)
        ratio = paired_ratio(name, 0)
        target = TARGETS.get(name)
        if target is None:
            verdict, target_text = ("baseline" if name == BASELINE else "not gated"), ""
        else:
            verdict = "ok" if ratio <= target else "MISSED"
            missed = missed or ratio > target
            target_text = f"<={target:.1f}x"
        print(
            f"{name:<38} {statistics.median(values):>12.1f} {deciles[0]:>7.1f} "
            f"{deciles[-1]:>7.1f} {ratio:>5.2f}x {statistics.median(cpus[name]):>11.1f} "
            f"{paired_ratio(name, 1):>5.2f}x {target_text:>7}  {verdict}"
        )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
