"""Nothing escapes: a job that raises something that is not an ``Exception`` still leaves its
row ``failed``, with finished_at, duration_ms and an error_message that says what happened.

The field's report: a run left ``running`` for good because ``asyncio.CancelledError``, a
library's ``sys.exit()`` or a Ctrl-C reached the task as a ``BaseException`` that its
``except Exception`` did not see. The worker shim makes the job raise each of them from inside,
mid-run (``harness.workers.jobfaults``), on a real worker of every pool, in a mode that runs the
job in the task's own thread (``no_loop``) and one that runs it on the runner's helper
(``running_loop``), where the exception has to cross from the helper back to the task.
"""

from __future__ import annotations

import pytest

from harness.core.logs import JOB_FAULT_TEMPLATE, task_lines
from harness.workers.farm import WorkerRuns
from harness.workers.jobfaults import SYSTEM_EXIT_CODE, JobFault
from harness.workers.marketplace import MarketplaceServer
from scenarios.expect import assert_run_log, assert_shim_lines

pytestmark = pytest.mark.integration

PROJECT_ID = 12
# What error_message says for each: the type, and in words what happened.
EXPECTED_ERROR = {
    JobFault.CANCELLED: "CancelledError: the job was cancelled",
    JobFault.SYSTEM_EXIT: f"SystemExit: the job called sys.exit({SYSTEM_EXIT_CODE})",
    JobFault.KEYBOARD_INTERRUPT: "KeyboardInterrupt: the job was interrupted (SIGINT)",
}


@pytest.mark.parametrize("mode", ["no_loop", "running_loop"])
@pytest.mark.parametrize("fault", list(EXPECTED_ERROR), ids=[f.value for f in EXPECTED_ERROR])
def test_a_base_exception_inside_the_job_leaves_the_row_failed(
    fault: JobFault,
    mode: str,
    pool_runs: WorkerRuns,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    harness_runner: str,
) -> None:
    # Slow pages, so that the job is still fetching when the fault is raised inside it.
    marketplace.configure(marketplace_code, latency_s=0.2)
    done = pool_runs.wait(
        pool_runs.send(
            mode, marketplace_code=marketplace_code, project_id=PROJECT_ID, job_fault=fault
        ),
        timeout=30.0,
    )
    row, lines = done.row, pool_runs.lines()
    error = EXPECTED_ERROR[fault]
    assert (row.status, row.error_message) == ("failed", error), pool_runs.rows_text()
    assert row.finished_at is not None and row.duration_ms is not None, pool_runs.rows_text()
    assert row.duration_ms >= 0 and row.finished_at >= row.started_at
    assert row.stats_json is None
    assert_run_log(lines, row.id, mode, runner=harness_runner, outcome="failed", error=error)
    assert_shim_lines(lines, row.id, mode, job_fault=fault)
    # One end, and only one: nothing else (the worker's main process, a retry) says otherwise.
    failed = [line.headline for line in task_lines(lines, row.id)][1:]
    assert failed == [f"Run {row.id} failed: {error}"], failed
    assert JOB_FAULT_TEMPLATE.format(run_id=row.id, fault=fault.value) in [
        line.headline for line in lines
    ]
