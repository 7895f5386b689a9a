"""2. A worker's warm shutdown (SIGTERM) mid-run: the run finishes, or is redelivered and finishes;
it is never left stuck.

SIGTERM goes to the worker's main process, as ``celery multi stop``, ``kill <pid>`` or a
supervisor's stop do. Celery then stops taking messages, waits for the task in hand, and exits.
A second run queued behind the first shows what happens to work the worker had not started: it
stays in the broker (or is handed back to it), and the next worker on the queue runs it.
"""

from __future__ import annotations

import signal
import uuid

import pytest

from harness.checks.assertions import assert_run_succeeded
from harness.checks.faults import (
    FaultWorkers,
    assert_fault_invariants,
    hold_source,
    release_source,
    served_rows,
    wait_acknowledged,
    wait_exited,
    wait_mid_run,
)
from harness.core.logs import STARTING_TEMPLATE, LogLine, task_lines
from harness.core.runs import RunRow, RunStore
from harness.workers.marketplace import MarketplaceServer

pytestmark = pytest.mark.integration

PROJECT_ID = 12
DOMAIN = "frontend_prices"
# What Celery prints (to stderr, which is the worker's log file) when SIGTERM arrives.
WARM_SHUTDOWN = "worker: Warm shutdown (MainProcess)"


def _succeeded(row: RunRow, lines: list[LogLine], marketplace: MarketplaceServer) -> None:
    assert_run_succeeded(
        row,
        log=lines,
        project_id=PROJECT_ID,
        **marketplace.served_stats(row.marketplace_code, DOMAIN),
    )


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_warm_shutdown_mid_run_finishes_the_run(
    pool: str,
    fault_workers: FaultWorkers,
    fault_store: RunStore,
    marketplace: MarketplaceServer,
) -> None:
    queue = fault_workers.shared_queue()
    first = fault_workers.start(pool=pool, concurrency=1, queue=queue)
    held_code, next_code = (f"mp-{uuid.uuid4().hex[:8]}" for _ in range(2))
    hold_source(marketplace, held_code)
    held = fault_store.create(project_id=PROJECT_ID, marketplace_code=held_code)
    behind = fault_store.create(project_id=PROJECT_ID, marketplace_code=next_code)
    first.send(held, loop_mode="no_loop")
    wait_mid_run(fault_store, held, marketplace=marketplace, code=held_code, worker=first)
    first.send(behind, loop_mode="no_loop")  # queued behind it: one task at a time

    first.kill(signal.SIGTERM, group=False)
    first.wait_for_log(
        lambda lines: any(WARM_SHUTDOWN in line.raw for line in lines),
        what=f"{WARM_SHUTDOWN!r}",
    )
    # The shutdown has begun and the run is still in flight: now let it finish.
    assert fault_store.read(held).status == "running"
    release_source(marketplace, held_code)
    code = wait_exited(first)

    assert code == 0, f"a warm shutdown exits 0, got {code}"
    _succeeded(fault_store.read(held), first.log_lines(), marketplace)
    never_started = fault_store.read(behind)
    assert never_started.status == "queued", (
        f"the worker was shutting down; it must not have started run {behind}: {never_started}"
    )

    # The next worker on the queue (of any pool) gets what the first one left: nothing is lost.
    second = fault_workers.start(pool="solo", queue=queue)
    _succeeded(fault_store.wait_terminal(behind), second.log_lines(), marketplace)

    wait_acknowledged(fault_workers.broker_url, queue)  # nothing left to come back later
    lines = fault_workers.log_lines()
    for run_id in (held, behind):
        starts = [
            line
            for line in task_lines(lines, run_id)
            if line.headline == STARTING_TEMPLATE.format(run_id=run_id)
        ]
        assert len(starts) == 1, f"run {run_id} was started {len(starts)} times"
    assert_fault_invariants(
        fault_store,
        lines,
        expected_rows={
            **served_rows(marketplace, held_code, project_id=PROJECT_ID),
            **served_rows(marketplace, next_code, project_id=PROJECT_ID),
        },
    )
