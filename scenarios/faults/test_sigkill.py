"""1. A worker killed with SIGKILL mid-run: its run stays ``running`` with a stale heartbeat until
``unlock_stale_runs`` marks it ``failed`` with its reason; a live worker's run is never touched.

The unlock is the runbook's own remedy, ``scripts/unlock_stale_runs.py`` (its ``main``, with
``--older-than 1s``: five missed heartbeats of the fault workers).

The runbook's first case ("run остался в running": the worker fell over, use the script). The
victim is a prefork worker killed as a whole process group, so its pool child (the process that
runs the task) dies too; the survivor runs a held run with a fresh heartbeat through the unlock.
"""

from __future__ import annotations

import signal
import uuid

import pytest

from app.clock import utcnow
from app.maintenance import MESSAGE_PREFIX, format_duration
from harness.checks.assertions import assert_run_failed, assert_run_succeeded
from harness.checks.faults import (
    STALE_AFTER,
    FaultWorkers,
    assert_fault_invariants,
    hold_source,
    release_source,
    served_rows,
    wait_dead,
    wait_heartbeat_fresh,
    wait_heartbeat_older_than,
    wait_mid_run,
)
from harness.core.runs import RunStore
from harness.workers.marketplace import MarketplaceServer
from scripts.unlock_stale_runs import main as unlock_script

pytestmark = pytest.mark.integration

PROJECT_ID = 11


def test_sigkilled_run_is_unlocked_and_a_live_run_is_left_alone(
    fault_workers: FaultWorkers,
    fault_store: RunStore,
    fault_db: str,
    marketplace: MarketplaceServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    victim = fault_workers.start(pool="prefork", concurrency=1)
    survivor = fault_workers.start(pool="solo")
    dead_code, live_code = (f"mp-{uuid.uuid4().hex[:8]}" for _ in range(2))
    hold_source(marketplace, dead_code)
    hold_source(marketplace, live_code)

    dead = fault_store.create(project_id=PROJECT_ID, marketplace_code=dead_code)
    live = fault_store.create(project_id=PROJECT_ID, marketplace_code=live_code)
    victim.send(dead, loop_mode="no_loop")
    survivor.send(live, loop_mode="no_loop")
    wait_mid_run(fault_store, dead, marketplace=marketplace, code=dead_code, worker=victim)
    wait_mid_run(fault_store, live, marketplace=marketplace, code=live_code, worker=survivor)

    group = victim.group_pids()
    assert len(group) >= 2, f"a prefork worker is a main process and a pool child, got {group}"
    victim.kill(signal.SIGKILL)  # the whole group: the child running the task dies too
    wait_dead(group)
    killed_at = utcnow()

    # Nobody finishes or beats for it any more: it stays running until its heartbeat is stale.
    stale = wait_heartbeat_older_than(fault_store, dead, STALE_AFTER)
    assert stale.status == "running", f"the killed run should still be running: {stale}"
    assert stale.heartbeat_at is not None and stale.heartbeat_at <= killed_at, (
        f"a dead worker's run got a heartbeat after the kill: {stale}"
    )
    # The live run's heartbeat is fresh at this moment, well within the bound.
    wait_heartbeat_fresh(fault_store, live, STALE_AFTER / 2)

    # The runbook's remedy, as a person runs it: scripts/unlock_stale_runs.py.
    bound = format_duration(STALE_AFTER)
    assert unlock_script(["--older-than", bound, "--database-url", fault_db]) == 0
    printed = capsys.readouterr().out.splitlines()

    assert printed[0].startswith(f"unlocked run {dead}: project {PROJECT_ID}, "), printed
    assert printed[-1].startswith(f"unlocked 1 stale run (older than {bound})"), (
        f"the script must unlock exactly the killed run {dead}:\n" + "\n".join(printed)
    )
    row = fault_store.read(dead)
    assert_run_failed(row, error=f"{MESSAGE_PREFIX}: status was running, last heartbeat")
    assert row.heartbeat_at == stale.heartbeat_at, "the unlock keeps the evidence"
    assert row.stats_json is None

    untouched = fault_store.read(live)
    assert untouched.status == "running" and untouched.error_message is None, (
        f"unlock_stale_runs touched the live run: {untouched}"
    )
    assert survivor.is_alive()

    release_source(marketplace, live_code)
    finished = fault_store.wait_terminal(live)
    assert_run_succeeded(
        finished,
        log=survivor.log_lines(),
        project_id=PROJECT_ID,
        **marketplace.served_stats(live_code, "frontend_prices"),
    )

    assert survivor.ping(), "the survivor no longer answers a ping after its run"
    report = assert_fault_invariants(
        fault_store,
        fault_workers.log_lines(),
        expected_rows=served_rows(marketplace, live_code, project_id=PROJECT_ID),
    )
    assert report.recovered == [dead]
