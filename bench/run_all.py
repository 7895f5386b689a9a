"""Run every benchmark under ``bench/`` in turn; exit non-zero if any missed its target.

    .venv/bin/python bench/run_all.py

Runs ``bench_runner.py``, ``bench_services.py`` and ``bench_matrix.py`` one after another (never
at the same time: they would load each other), each with this interpreter and its default
options, and prints a summary line per benchmark. Exit code: 0 if all exited 0, else the first
non-zero exit code seen (1: a target missed; 2: a benchmark could not measure what it meant to).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

BENCH_DIR: Final = Path(__file__).resolve().parent
BENCHES: Final = ("bench_runner.py", "bench_services.py", "bench_matrix.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.parse_args(argv)
    results: list[tuple[str, int, float]] = []
    for name in BENCHES:
        print(f"=== {name}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.run(
            [sys.executable, str(BENCH_DIR / name)], cwd=BENCH_DIR.parent, check=False
        ).returncode
        results.append((name, code, time.perf_counter() - t0))
    print("=== summary")
    for name, code, wall in results:
        verdict = "ok" if code == 0 else f"MISSED (exit {code})"
        print(f"{name:<20} {wall:7.1f} s  {verdict}")
    return next((code for _, code, _ in results if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
