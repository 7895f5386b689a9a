"""Runs in flight at once: twice the worker's concurrency, sent together, on every pool that runs
more than one task at a time (threads x4, gevent x8, prefork x2).

The field's gevent report is exactly this: one task alone works, several in flight make
``asyncio.run()`` nest. Every run must end ``success`` with its own stats and rows, its runner
line must name that run, and no run may wait for another: measured from the rows' own
``started_at`` and ``finished_at``, ``concurrency`` runs were running at one instant.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from harness.checks.assertions import assert_run_succeeded
from harness.workers.farm import WorkerRuns
from harness.workers.marketplace import MarketplaceServer
from scenarios.expect import DOMAIN, assert_prices_stored, assert_run_log, assert_shim_lines

pytestmark = pytest.mark.integration

PROJECT_ID = 11
# Every request of these runs waits this long, so a run lasts at least as long: far more than
# the worker needs to hand its queued messages to its pool, even on two loaded cores.
LATENCY_S = 0.5


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals that hold at one instant (an end before a start at the same instant)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def test_max_overlap_counts_runs_at_one_instant() -> None:
    t = [datetime(2026, 1, 1, 0, 0, s) for s in range(6)]
    assert max_overlap([(t[0], t[2]), (t[1], t[3]), (t[2], t[4])]) == 2
    assert max_overlap([(t[0], t[1]), (t[1], t[2])]) == 1
    assert max_overlap([(t[0], t[5]), (t[1], t[4]), (t[2], t[3])]) == 3


@pytest.mark.parametrize("mode", ["no_loop", "running_loop"])
def test_runs_in_flight_at_once_each_end_on_their_own(
    mode: str,
    worker_pool: tuple[str, str],
    pool_runs: WorkerRuns,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    harness_runner: str,
    record_property: Any,
) -> None:
    concurrency = pool_runs.worker.concurrency
    if concurrency < 2:
        pytest.skip(f"{worker_pool[0]} runs one task at a time: no two runs can be in flight")
    codes = [f"{marketplace_code}-{i}" for i in range(2 * concurrency)]
    for code in codes:
        marketplace.configure(code, latency_s=LATENCY_S)

    sent = [pool_runs.send(mode, marketplace_code=code, project_id=PROJECT_ID) for code in codes]
    done = [pool_runs.wait(run, timeout=60.0) for run in sent]

    lines = pool_runs.lines()
    for run, code in zip(done, codes, strict=True):
        assert_run_succeeded(
            run.row, log=lines, project_id=PROJECT_ID, **marketplace.served_stats(code, DOMAIN)
        )
        assert run.row.marketplace_code == code, f"run {run.run_id} is not its own: {run.row}"
        assert_run_log(lines, run.run_id, mode, runner=harness_runner)
        assert_shim_lines(lines, run.run_id, mode, shared_loop_allowed=worker_pool[0] == "gevent")
        assert_prices_stored(
            pool_runs.store,
            project_id=PROJECT_ID,
            marketplace_code=code,
            served=marketplace.expected(code, DOMAIN),
        )
    overlap = max_overlap([(run.row.started_at, run.row.finished_at) for run in done])
    record_property("max_runs_in_flight", overlap)
    assert overlap >= concurrency, (
        f"at most {overlap} of {len(done)} runs were running at one instant on a "
        f"{worker_pool[0]} worker of concurrency {concurrency}: runs waited for each other\n"
        + "\n".join(
            f"  run {r.run_id}: {r.row.started_at:%H:%M:%S.%f} -> {r.row.finished_at:%H:%M:%S.%f}"
            for r in done
        )
    )
