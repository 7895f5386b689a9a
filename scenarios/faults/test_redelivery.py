"""3. Redelivery (``acks_late``): a message that comes back never runs a run a second time, and
the domain tables get no duplicate rows.

With ``task_acks_late`` a message is acknowledged only when the task returns, so a worker that
dies mid-run (or after the run but before the ack) leaves it unacknowledged, and the broker hands
it to the next worker. On Redis that happens once it is older than the transport's
``visibility_timeout``: one hour by default, so the second worker here runs with
``harness.checks.faults.REDELIVERY_TRANSPORT_OPTIONS`` (one second, looked for every 0.1 s); kombu's
``restore_visible`` in that worker puts the message back on the queue, as it would in
production an hour later. The task must then log it as a no-op:
``Run N is not queued (status: ...); not executing it again``.
"""

from __future__ import annotations

import signal
import uuid

import pytest

from app.maintenance import MESSAGE_PREFIX, unlock_stale_runs
from harness.checks.assertions import assert_run_failed, assert_run_succeeded
from harness.checks.faults import (
    REDELIVERY_TRANSPORT_OPTIONS,
    STALE_AFTER,
    FaultWorkers,
    assert_fault_invariants,
    release_source,
    served_rows,
    start_held_run,
    unacked_messages,
    wait_acknowledged,
    wait_dead,
    wait_heartbeat_older_than,
)
from harness.core.logs import (
    COMPLETED_TEMPLATE,
    STALLING_LINE,
    STARTING_TEMPLATE,
    LogLine,
    task_lines,
)
from harness.core.runs import RunStore
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess

pytestmark = pytest.mark.integration

PROJECT_ID = 13
DOMAIN = "frontend_prices"
SKIPPED = "Run {run_id} is not queued (status: {status}); not executing it again"


def _wait_skipped(worker: CeleryWorkerProcess, run_id: int, status: str) -> list[LogLine]:
    """Wait for the redelivered message's no-op line; fail at once if it ran the run instead."""
    skipped = SKIPPED.format(run_id=run_id, status=status)
    lines = worker.wait_for_log(
        lambda lines: any(x.headline == skipped for x in lines) or _starts(lines, run_id) > 0,
        timeout=20.0,
        what=f"{skipped!r} (the message redelivered to {worker.node_name})",
    )
    assert _starts(lines, run_id) == 0, (
        f"the redelivered message executed run {run_id} a second time:\n"
        + "\n".join(x.raw for x in task_lines(lines, run_id))
    )
    return lines


def _starts(lines: list[LogLine], run_id: int) -> int:
    start = STARTING_TEMPLATE.format(run_id=run_id)
    return sum(1 for line in task_lines(lines, run_id) if line.headline == start)


def test_killed_after_the_claim_the_redelivered_message_is_a_no_op(
    fault_workers: FaultWorkers,
    fault_store: RunStore,
    fault_db: str,
    marketplace: MarketplaceServer,
) -> None:
    queue = fault_workers.shared_queue()
    victim = fault_workers.start(pool="prefork", concurrency=1, queue=queue)
    run_id, code = start_held_run(fault_store, victim, marketplace, project_id=PROJECT_ID)
    group = victim.group_pids()
    victim.kill(signal.SIGKILL)  # claimed, running, its message unacknowledged
    wait_dead(group)
    assert unacked_messages(fault_workers.broker_url, queue) == 1
    release_source(marketplace, code)  # a second execution would now finish quickly

    heir = fault_workers.start(queue=queue, transport_options=REDELIVERY_TRANSPORT_OPTIONS)
    lines = _wait_skipped(heir, run_id, "running")

    wait_acknowledged(fault_workers.broker_url, queue)  # the heir acknowledged the no-op
    assert _starts(fault_workers.log_lines(), run_id) == 1, "the run was executed again"
    assert fault_store.read(run_id).status == "running", "the no-op changed the row"
    # What is left is the runbook's stuck run, and the script's job.
    wait_heartbeat_older_than(fault_store, run_id, STALE_AFTER)
    assert [u.id for u in unlock_stale_runs(fault_db, older_than=STALE_AFTER)] == [run_id]
    assert_run_failed(fault_store.read(run_id), error=f"{MESSAGE_PREFIX}: status was running")
    report = assert_fault_invariants(
        fault_store,
        fault_workers.log_lines(),
        expected_rows={},  # its transaction died with it
    )
    assert report.recovered == [run_id]
    assert lines  # the heir's log, for the record


def test_killed_after_the_run_before_the_ack_the_redelivered_message_is_a_no_op(
    fault_workers: FaultWorkers,
    fault_store: RunStore,
    marketplace: MarketplaceServer,
) -> None:
    queue = fault_workers.shared_queue()
    victim = fault_workers.start(pool="prefork", concurrency=1, queue=queue)
    run_id, code = start_held_run(fault_store, victim, marketplace, project_id=PROJECT_ID)

    # Freeze the main process, which is the one that acknowledges; its pool child runs on and
    # finishes the run. Killed now, the worker dies between the finish and the ack.
    victim.kill(signal.SIGSTOP, group=False)
    release_source(marketplace, code)
    done = fault_store.wait_terminal(run_id)
    victim.wait_for_log(
        lambda lines: any(x.headline == COMPLETED_TEMPLATE.format(run_id=run_id) for x in lines),
        what=f"run {run_id} completed",
    )
    assert_run_succeeded(
        done,
        log=victim.log_lines(),
        project_id=PROJECT_ID,
        **marketplace.served_stats(code, DOMAIN),
    )
    group = victim.group_pids()
    victim.kill(signal.SIGKILL)
    wait_dead(group)
    assert unacked_messages(fault_workers.broker_url, queue) == 1, "it was acknowledged"

    heir = fault_workers.start(queue=queue, transport_options=REDELIVERY_TRANSPORT_OPTIONS)
    _wait_skipped(heir, run_id, "success")
    # The other way a finished run's message comes back: the same task sent again.
    heir.send(run_id, loop_mode="no_loop", task_id=done.celery_task_id)
    heir.wait_for_log(
        lambda lines: (
            sum(x.headline == SKIPPED.format(run_id=run_id, status="success") for x in lines) == 2
        ),
        what="the second no-op",
    )

    wait_acknowledged(fault_workers.broker_url, queue)
    assert fault_store.read(run_id) == done, "a redelivered message changed the finished row"
    assert _starts(fault_workers.log_lines(), run_id) == 1, "the run was executed again"
    assert_fault_invariants(
        fault_store,
        fault_workers.log_lines(),
        expected_rows=served_rows(marketplace, code, project_id=PROJECT_ID),
    )


def test_taken_but_never_started_the_message_comes_back_by_the_services_own_timeout(
    fault_workers: FaultWorkers,
    fault_store: RunStore,
    marketplace: MarketplaceServer,
) -> None:
    """What a Redis outage does to a reserved message, made deterministic: the worker that took
    it is lost before the task began, so nothing hands it back. The service's
    APP_BROKER_VISIBILITY_TIMEOUT_S, not a harness option, must bring it back, and the run then
    runs once and succeeds (before that setting, it waited kombu's hour, the run queued)."""
    queue = fault_workers.shared_queue()
    victim = fault_workers.start(pool="prefork", concurrency=1, queue=queue, stall_before_task=True)
    code = f"mp-{uuid.uuid4().hex[:8]}"
    run_id = fault_store.create(project_id=PROJECT_ID, marketplace_code=code)
    task_id = victim.send(run_id, loop_mode="no_loop")
    stalling = STALLING_LINE.format(task_id=task_id)
    victim.wait_for_log(lambda lines: any(x.headline == stalling for x in lines), what=stalling)
    group = victim.group_pids()
    victim.kill(signal.SIGKILL)
    wait_dead(group)
    assert unacked_messages(fault_workers.broker_url, queue) == 1, "the message was not held"
    assert fault_store.read(run_id).status == "queued"

    heir = fault_workers.start(queue=queue, APP_BROKER_VISIBILITY_TIMEOUT_S="1")
    done = fault_store.wait_terminal(run_id, timeout=15.0)
    assert_run_succeeded(
        done, log=heir.log_lines(), project_id=PROJECT_ID, **marketplace.served_stats(code, DOMAIN)
    )
    wait_acknowledged(fault_workers.broker_url, queue)
    assert _starts(fault_workers.log_lines(), run_id) == 1, "the run was executed twice"
    assert_fault_invariants(
        fault_store,
        fault_workers.log_lines(),
        expected_rows=served_rows(marketplace, code, project_id=PROJECT_ID),
    )
