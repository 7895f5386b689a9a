"""A run that ``unlock_stale_runs`` has marked ``failed`` stays ``failed`` when its job ends late.

The runbook's remedy for a stuck run is the unlock script; the worker that held the run may
still be alive and finish it afterwards. Its late finish must not overwrite the unlock (the
row would flip to ``success`` after an operator was told it failed, or the other way round),
and its log must say so instead of claiming the run "completed successfully".

The heartbeat is made to stall (a worker whose heartbeat interval is far longer than the run)
while the job waits on a held marketplace: the unlock then finds the run stale, as it would a
run whose worker hung.
"""

from __future__ import annotations

import pytest

from app.maintenance import MESSAGE_PREFIX, unlock_stale_runs
from harness.checks.assertions import assert_run_failed
from harness.checks.faults import (
    STALE_AFTER,
    FaultWorkers,
    release_source,
    start_held_run,
    wait_heartbeat_older_than,
)
from harness.core.logs import TRACE_LOGGER, task_lines
from harness.core.runs import RunStore
from harness.workers.marketplace import MarketplaceServer

pytestmark = pytest.mark.integration

PROJECT_ID = 14
LATE = (
    "Run {run_id} was no longer running when it finished: its end (success) is not recorded, "
    "the row keeps what finished it first"
)


def test_an_unlocked_run_stays_failed_when_its_job_finishes_late(
    fault_workers: FaultWorkers,
    fault_store: RunStore,
    fault_db: str,
    marketplace: MarketplaceServer,
) -> None:
    worker = fault_workers.start(
        pool="solo", queue=fault_workers.shared_queue(), APP_HEARTBEAT_INTERVAL_S="600"
    )
    run_id, code = start_held_run(fault_store, worker, marketplace, project_id=PROJECT_ID)
    wait_heartbeat_older_than(fault_store, run_id, STALE_AFTER)
    assert fault_store.read(run_id).status == "running"
    unlocked = unlock_stale_runs(fault_db, older_than=STALE_AFTER)
    assert [u.id for u in unlocked] == [run_id], unlocked
    before = fault_store.read(run_id)
    assert_run_failed(before, error=f"{MESSAGE_PREFIX}: status was running")

    release_source(marketplace, code)  # the job goes on, and finishes
    late = LATE.format(run_id=run_id)
    lines = worker.wait_for_log(
        lambda lines: any(
            line.logger == TRACE_LOGGER and "succeeded" in line.headline for line in lines
        ),
        timeout=30.0,
        what=f"the end of run {run_id}'s task",
    )
    after = fault_store.read(run_id)
    assert after.as_dict() == before.as_dict(), (
        f"the late finish changed the unlocked row:\n  before: {before}\n  after:  {after}"
    )
    headlines = [line.headline for line in task_lines(lines, run_id)]
    assert late in [line.headline for line in lines], "\n".join(line.raw for line in lines[-20:])
    assert f"Run {run_id} completed successfully" not in headlines, headlines
