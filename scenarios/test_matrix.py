"""The runbook's check, automated, in every cell: loop mode x pool x broker (and in_process).

A run is created as the API creates it, executed by a real Celery worker (or, in the
``in_process`` cell, by the task's function called inside the test's running loop), and then
checked as the runbook's steps 3 and 4 check it by eye: the ``ingest_runs`` row (read on the
harness's own connection, after the worker committed) and the run's worker log lines.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.tasks.ingest import run_ingest
from fixtures.worker import InProcessRuns
from harness.checks.assertions import assert_celery_agrees, assert_run_failed, assert_run_succeeded
from harness.core.runs import RunRow
from harness.workers.farm import CompletedRun, WorkerRuns
from harness.workers.loopmodes import IN_PROCESS, LOOP_MODES
from harness.workers.marketplace import MarketplaceServer
from scenarios.expect import DOMAIN, assert_prices_stored, assert_run_log, assert_shim_lines

pytestmark = pytest.mark.integration

PROJECT_ID = 7
# The marketplace keeps failing past the client's retries: what the failing run reports.
UNAVAILABLE = "SourceUnavailableError: marketplace answered 503"


def _record_duration(record_property: Any, row: RunRow) -> None:
    # Recorded before any assertion, so a failing cell still reports how long its run took.
    if row.duration_ms is not None:
        record_property("run_duration_ms", row.duration_ms)


def _check_success(
    row: RunRow,
    lines: Any,
    mode: str,
    runner: str,
    marketplace: MarketplaceServer,
    code: str,
    runs: WorkerRuns | InProcessRuns,
) -> None:
    served = marketplace.expected(code, DOMAIN)
    # The row first: against the pre-fix runner this is the check that fails, and its
    # message (status, error_message, the run's log lines) is the cell's verdict.
    assert_run_succeeded(
        row,
        log=lines,
        project_id=PROJECT_ID,
        **marketplace.served_stats(code, DOMAIN),
    )
    assert_run_log(lines, row.id, mode, runner=runner)
    assert_prices_stored(runs.store, project_id=PROJECT_ID, marketplace_code=code, served=served)


def _check_failure(
    row: RunRow, lines: Any, mode: str, runner: str, runs: WorkerRuns | InProcessRuns
) -> None:
    assert_run_failed(row, error=UNAVAILABLE, log=lines)
    assert row.stats_json is None, f"a failed run stores no stats, got {row.stats_json!r}"
    # The exact failed line: "Run N failed: <the error_message, as stored>".
    assert_run_log(lines, row.id, mode, runner=runner, outcome="failed", error=row.error_message)
    assert runs.store.count_rows(DOMAIN, marketplace_code=row.marketplace_code) == 0, (
        "a failed run is one rolled-back transaction: no domain row may remain"
    )


# -- in a worker -----------------------------------------------------------------------------


def _run(
    runs: WorkerRuns, cell: tuple[str, str, str], code: str, record_property: Any
) -> CompletedRun:
    mode, _, _ = cell
    done = runs.run(mode, marketplace_code=code, project_id=PROJECT_ID)
    _record_duration(record_property, done.row)
    return done


@pytest.mark.matrix(modes=LOOP_MODES)
def test_success(
    matrix_cell: tuple[str, str, str],
    worker_runs: WorkerRuns,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    record_property: Any,
    harness_runner: str,
) -> None:
    mode = matrix_cell[0]
    done = _run(worker_runs, matrix_cell, marketplace_code, record_property)

    _check_success(
        done.row, done.lines, mode, harness_runner, marketplace, marketplace_code, worker_runs
    )
    assert_celery_agrees(done.lines, done.task_id, done.row)
    # The harness's own lines: the mode was forced as asked, an idle loop survived the run.
    assert_shim_lines(done.lines, done.run_id, mode)


@pytest.mark.matrix(modes=LOOP_MODES)
def test_failing_run(
    matrix_cell: tuple[str, str, str],
    worker_runs: WorkerRuns,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    record_property: Any,
    harness_runner: str,
) -> None:
    marketplace.configure(marketplace_code, fail_always=True)
    mode = matrix_cell[0]
    done = _run(worker_runs, matrix_cell, marketplace_code, record_property)

    _check_failure(done.row, done.lines, mode, harness_runner, worker_runs)
    assert_celery_agrees(done.lines, done.task_id, done.row)
    # Every attempt reached the marketplace: 1 + APP_HTTP_RETRIES=2 (harness.workers.farm).
    assert marketplace.requests(marketplace_code).statuses() == [503, 503, 503]
    # The harness's own lines: the mode was forced as asked, an idle loop survived the run.
    assert_shim_lines(done.lines, done.run_id, mode)


# -- in the test's own running loop ------------------------------------------------------------


@pytest.mark.matrix(modes=(IN_PROCESS,))
@pytest.mark.asyncio
async def test_success_in_process(
    matrix_cell: tuple[str, str, str],
    in_process_runs: InProcessRuns,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    record_property: Any,
    harness_runner: str,
) -> None:
    """The runbook's "test environment" cause: the task's function under a running loop."""
    run_id = in_process_runs.create(marketplace_code=marketplace_code, project_id=PROJECT_ID)
    run_ingest(run_id)  # synchronously, from inside pytest-asyncio's running loop
    row = in_process_runs.store.read(run_id)
    _record_duration(record_property, row)

    _check_success(
        row,
        in_process_runs.lines(),
        IN_PROCESS,
        harness_runner,
        marketplace,
        marketplace_code,
        in_process_runs,
    )


@pytest.mark.matrix(modes=(IN_PROCESS,))
@pytest.mark.asyncio
async def test_failing_run_in_process(
    matrix_cell: tuple[str, str, str],
    in_process_runs: InProcessRuns,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    record_property: Any,
    harness_runner: str,
) -> None:
    marketplace.configure(marketplace_code, fail_always=True)
    run_id = in_process_runs.create(marketplace_code=marketplace_code, project_id=PROJECT_ID)
    run_ingest(run_id)
    row = in_process_runs.store.read(run_id)
    _record_duration(record_property, row)

    _check_failure(row, in_process_runs.lines(), IN_PROCESS, harness_runner, in_process_runs)
