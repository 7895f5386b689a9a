"""A Ctrl-C to a worker mid-run, twice (Celery's cold shutdown): the row ends ``failed``.

The first SIGINT asks for a warm shutdown, as SIGTERM does; the second makes it cold (SIGQUIT
does at once), and Celery's handler raises in the main process, where a solo worker runs the
task's body: ``WorkerTerminate``, or with Celery 5.7's solo pool a ``NotImplementedError`` ("does
not implement kill_job"). That is the field's "Ctrl-C delivered to the worker mid-run": the job
is interrupted where it stands. The run must still be finished, ``failed`` with finished_at,
duration_ms and an error that says the worker was shut down, before the worker exits.
"""

from __future__ import annotations

import re
import signal
import uuid

import pytest

from harness.checks.faults import (
    FaultWorkers,
    hold_source,
    release_source,
    wait_exited,
    wait_mid_run,
)
from harness.core.logs import task_lines
from harness.core.runs import RunStore
from harness.workers.marketplace import MarketplaceServer

pytestmark = pytest.mark.integration

PROJECT_ID = 13
WARM_SHUTDOWN = "worker: Warm shutdown (MainProcess)"
# Celery 5.7's solo pool raises "does not implement kill_job" from its cold shutdown handler;
# a pool that can kill its job raises WorkerTerminate. Either way the row says what happened.
ERROR = re.compile(r"^(WorkerTerminate: )?the worker was shut down while the run ran( \(.+\))?$")


@pytest.mark.parametrize(
    "signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGQUIT,)], ids=["sigint-twice", "sigquit"]
)
def test_a_second_sigint_mid_run_leaves_the_row_failed(
    signals: tuple[int, ...],
    fault_workers: FaultWorkers,
    fault_store: RunStore,
    marketplace: MarketplaceServer,
) -> None:
    worker = fault_workers.start(pool="solo", queue=fault_workers.shared_queue())
    code = f"mp-{uuid.uuid4().hex[:8]}"
    hold_source(marketplace, code)
    run_id = fault_store.create(project_id=PROJECT_ID, marketplace_code=code)
    worker.send(run_id, loop_mode="no_loop")
    wait_mid_run(fault_store, run_id, marketplace=marketplace, code=code, worker=worker)

    for sig in signals:
        worker.kill(sig, group=False)
        if len(signals) > 1 and sig == signals[0]:
            worker.wait_for_log(
                lambda lines: any(WARM_SHUTDOWN in line.raw for line in lines),
                what=repr(WARM_SHUTDOWN),
            )
    try:
        exit_code = wait_exited(worker)
    finally:
        release_source(marketplace, code)

    row = fault_store.read(run_id)
    assert row.status == "failed" and ERROR.match(row.error_message or ""), row
    assert row.finished_at is not None and row.duration_ms is not None, row
    lines = worker.log_lines()
    failed = [line.headline for line in task_lines(lines, run_id)][1:]
    assert failed == [f"Run {run_id} failed: {row.error_message}"], failed
    assert exit_code is not None, "the worker did not exit"
