"""A pool child killed under its run -- by Celery's hard time limit, or from outside as the OOM
killer does: the worker's main process finishes the row ``failed`` at once, with the reason,
instead of leaving it ``running`` until ``unlock_stale_runs`` comes by
(``app.tasks.ingest.IngestRequest``). Then the worker, with a new pool child, runs the next run.

Prefork: only its pool enforces time limits, and only there does a killed child leave a live
main process behind. The service always has a soft limit, which ends a run before the hard one
(test_soft_time_limit.py); the hard limit is reached when the soft one cannot interrupt the job
(stuck in a C call), which the fault worker's ``stuck_past_soft_limit`` stands in for.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Final

import pytest

from harness.checks.assertions import assert_run_failed, assert_run_succeeded
from harness.checks.faults import (
    FaultWorkers,
    hold_source,
    start_held_run,
    wait_answers_ping,
    wait_dead,
)
from harness.core.runs import RunStore
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess

pytestmark = pytest.mark.integration

PROJECT_ID: Final = 17
DOMAIN: Final = "frontend_prices"
SOFT_LIMIT_S: Final = 0.3
HARD_LIMIT_S: Final = 1.0
# Well under the staleness an unlock would need (and no unlock runs): the main process did it.
FINISHED_WITHIN_S: Final = 10.0


def _next_run_succeeds(
    worker: CeleryWorkerProcess, store: RunStore, marketplace: MarketplaceServer, since: int
) -> None:
    wait_answers_ping(worker)
    code = f"mp-{uuid.uuid4().hex[:8]}"
    run_id = store.create(project_id=PROJECT_ID, marketplace_code=code)
    worker.send(run_id)
    assert_run_succeeded(
        store.wait_terminal(run_id),
        log=worker.log_lines(since),
        project_id=PROJECT_ID,
        **marketplace.served_stats(code, DOMAIN),
    )


def test_a_child_killed_by_the_hard_time_limit_fails_its_run_at_once(
    fault_workers: FaultWorkers, fault_store: RunStore, marketplace: MarketplaceServer
) -> None:
    worker = fault_workers.start(pool="prefork", concurrency=1, stuck_past_soft_limit=True)
    since = worker.log_mark()
    # Held for good: only the hard limit can end it. Not start_held_run: on a loaded machine
    # the limit may fire before a poll has seen the run mid-run, and that is no failure here.
    code = f"mp-{uuid.uuid4().hex[:8]}"
    hold_source(marketplace, code)
    run_id = fault_store.create(project_id=PROJECT_ID, marketplace_code=code)
    worker.send(run_id, soft_time_limit=SOFT_LIMIT_S, time_limit=HARD_LIMIT_S)

    row = fault_store.wait_terminal(run_id, timeout=FINISHED_WITHIN_S)

    lines = worker.log_lines(since)
    assert_run_failed(
        row,
        error=f"TimeLimitExceeded: the run passed Celery's hard time limit ({HARD_LIMIT_S} s) "
        "and its worker process was killed",
        log=lines,
    )
    assert row.duration_ms is not None and row.duration_ms >= HARD_LIMIT_S * 1000 - 50, row
    assert any(f"Hard time limit ({HARD_LIMIT_S}s) exceeded" in ln.headline for ln in lines)
    _next_run_succeeds(worker, fault_store, marketplace, since)


def test_a_child_killed_from_outside_fails_its_run_at_once(
    fault_workers: FaultWorkers, fault_store: RunStore, marketplace: MarketplaceServer
) -> None:
    worker = fault_workers.start(pool="prefork", concurrency=1)
    since = worker.log_mark()
    run_id, _ = start_held_run(fault_store, worker, marketplace, project_id=PROJECT_ID)
    children = [pid for pid in worker.group_pids() if pid != worker.pid]
    assert children, f"a prefork worker is a main process and a pool child: {worker.group_pids()}"

    os.kill(children[0], signal.SIGKILL)  # as the OOM killer would
    wait_dead(children[:1])
    row = fault_store.wait_terminal(run_id, timeout=FINISHED_WITHIN_S)

    assert_run_failed(
        row,
        error="WorkerLostError: the worker process running it died: Worker exited prematurely: "
        "signal 9 (SIGKILL)",
        log=worker.log_lines(since),
    )
    assert worker.is_alive(), "the worker's main process must survive its child"
    _next_run_succeeds(worker, fault_store, marketplace, since)
