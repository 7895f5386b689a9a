"""How long the local service stack takes to start and stop, cold (no template) vs warm.

    .venv/bin/python bench/bench_services.py [--runs 5]

Cold: a fresh, empty template cache each run (initdb every time). Warm: the cached cluster is
copied. Start = until Postgres accepts a connection, the session database exists and Redis
answers PING; stop = both gone and their dirs removed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness.services import LocalPostgres, LocalRedis, ServiceStack


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stack_run(cache: Path) -> tuple[float, float]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    stack = ServiceStack("local", env=env)
    start = _time(stack.start)
    stop = _time(stack.stop)
    return start, stop


def _fmt(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"median {statistics.median(ms):7.1f} ms   (min {ms[0]:6.1f}, max {ms[-1]:6.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs

    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        root = Path(tmp)
        cold = [_stack_run(root / f"cold-{i}") for i in range(runs)]
        warm_cache = root / "warm"
        _stack_run(warm_cache)  # build the template once
        warm = [_stack_run(warm_cache) for _ in range(runs)]

        pg_cache = warm_cache / "ingest-harness"
        pg_warm: list[float] = []
        for _ in range(runs):
            pg = LocalPostgres(cache_dir=pg_cache)
            pg_warm.append(_time(pg.start))
            pg.stop()
        redis_start: list[float] = []
        for _ in range(runs):
            rd = LocalRedis()
            redis_start.append(_time(rd.start))
            rd.stop()

    print(f"local services, {runs} runs each (workdir: tmpfs if /dev/shm exists)")
    print(f"  stack start, cold (initdb)        {_fmt([s for s, _ in cold])}")
    print(f"  stack start, warm (template copy) {_fmt([s for s, _ in warm])}")
    print(f"  stack stop                        {_fmt([s for _, s in cold + warm])}")
    print(f"  postgres alone, warm              {_fmt(pg_warm)}")
    print(f"  redis alone                       {_fmt(redis_start)}")


if __name__ == "__main__":
    main()
