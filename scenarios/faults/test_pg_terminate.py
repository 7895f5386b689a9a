"""5. Postgres connections terminated during a run (``pg_terminate_backend``): the run ends
``failed`` with a clear error, or completes after a retry; a live worker never leaves its row
``running``.

Every session of the database is ended while the run is mid-fetch (its job holds its async
connection, in a transaction, and waits for the held source): what a failover, a pooler restart
or an administrator does. The job's own connection is gone, so its next statement fails; the
task's sync connections are gone too, so recording the failure needs a fresh one (the engine's
``pool_pre_ping``, and ``_finish``'s retries). Afterwards the same worker must run the next run
normally: nothing of the dead connections may linger in its pool.
"""

from __future__ import annotations

import re
import uuid

import pytest

from harness.checks.assertions import assert_run_failed, assert_run_succeeded
from harness.checks.faults import (
    BackendTerminator,
    FaultWorkers,
    assert_fault_invariants,
    release_source,
    served_rows,
    start_held_run,
    terminate_backends,
    wait_answers_ping,
    wait_for,
)
from harness.core.logs import COMPLETED_RE, FAILED_RE, LogLine, task_lines
from harness.core.runs import RunStore
from harness.workers.marketplace import MarketplaceServer
from scenarios.expect import assert_shim_lines

pytestmark = pytest.mark.integration

PROJECT_ID = 15
DOMAIN = "frontend_prices"
# What the job reports when its connection was terminated under it, in the first line of
# error_message: asyncpg's "connection is closed" (seen here: the server's FATAL arrived while
# the connection was idle in its transaction), or the server's own words, or asyncpg's
# "connection was closed in the middle of operation" when it dies during a statement.
CONNECTION_LOST = re.compile(
    r"^[^\n]*(?:connection is closed"
    r"|terminating connection due to administrator command"
    r"|connection was closed in the middle of operation"
    r"|ConnectionDoesNotExistError|AdminShutdownError)",
)
# A flapping database ends every session this often: each write of the run's end (a few ms)
# has a small chance to meet a dead connection, well within _finish's five attempts.
FLAP_EVERY_S = 0.05
FLAP_ROUNDS_BEFORE_RELEASE = 8


def _ended(lines: list[LogLine], run_id: int) -> bool:
    return any(
        COMPLETED_RE.match(x.headline) or FAILED_RE.match(x.headline)
        for x in task_lines(lines, run_id)
    )


@pytest.mark.parametrize(
    ("loop_mode", "flapping"),
    [
        pytest.param("no_loop", False, id="once-no_loop"),
        pytest.param("running_loop", False, id="once-running_loop"),
        pytest.param("no_loop", True, id="flapping-no_loop"),
    ],
)
def test_terminated_connections_mid_run_end_the_run(
    loop_mode: str,
    flapping: bool,
    fault_workers: FaultWorkers,
    fault_store: RunStore,
    fault_db: str,
    marketplace: MarketplaceServer,
) -> None:
    worker = fault_workers.start()
    run_id, code = start_held_run(
        fault_store, worker, marketplace, project_id=PROJECT_ID, loop_mode=loop_mode
    )

    if flapping:
        # Every connection dies again and again while the run ends: its heartbeats and the
        # write of its end meet dead connections too. Read the row only after the flapping.
        with BackendTerminator(fault_db, every_s=FLAP_EVERY_S) as terminator:
            # A few heartbeats' worth of flapping first, then the run's end in the middle of it.
            wait_for(
                lambda: True if terminator.rounds >= FLAP_ROUNDS_BEFORE_RELEASE else None,
                timeout=10.0,
                what=f"{FLAP_ROUNDS_BEFORE_RELEASE} rounds of terminations",
            )
            release_source(marketplace, code)
            worker.wait_for_log(lambda lines: _ended(lines, run_id), what=f"run {run_id}'s end")
        ended = terminator.ended
    else:
        ended = terminate_backends(fault_db)
        release_source(marketplace, code)

    assert any(b.backend_type == "client backend" for b in ended), ended
    row = fault_store.wait_terminal(run_id)
    expected = {}
    if row.status == "failed":
        assert_run_failed(row, error=CONNECTION_LOST, log=worker.log_lines())
        assert row.stats_json is None
    else:  # a retry got through: then it must be a complete, correct run
        assert_run_succeeded(
            row,
            log=worker.log_lines(),
            project_id=PROJECT_ID,
            **marketplace.served_stats(code, DOMAIN),
        )
        expected = served_rows(marketplace, code, project_id=PROJECT_ID)

    # The worker survived and its pool recovered: the next run is a normal one.
    wait_answers_ping(worker)
    next_code = f"mp-{uuid.uuid4().hex[:8]}"
    next_run = fault_store.create(project_id=PROJECT_ID, marketplace_code=next_code)
    worker.send(next_run, loop_mode=loop_mode)
    assert_run_succeeded(
        fault_store.wait_terminal(next_run),
        log=worker.log_lines(),
        project_id=PROJECT_ID,
        **marketplace.served_stats(next_code, DOMAIN),
    )
    expected.update(served_rows(marketplace, next_code, project_id=PROJECT_ID))
    assert_fault_invariants(fault_store, fault_workers.log_lines(), expected_rows=expected)
    # The harness's own lines: both runs were in the mode the cell names.
    for run in (run_id, next_run):
        assert_shim_lines(worker.log_lines(), run, loop_mode)
