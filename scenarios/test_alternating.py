"""Many runs in a row on one worker process per pool, the loop modes alternating.

Every run must succeed with its own mode's runner line: nothing bound to one run's event loop
(an asyncpg connection, an httpx client, a loop left set for the thread) may leak into the next,
and the shim's probe must find nothing left behind after each run. Two of the runs have their
first request fail, so that their job retries inside the same process.
The worker is the same process the matrix cells use, whatever runs it served before included.
"""

from __future__ import annotations

import itertools
from typing import Any, Final

import pytest

from harness.checks.assertions import assert_run_succeeded
from harness.core.cell import mode_applies
from harness.pytest.plugin import harness_config_key
from harness.workers.farm import WorkerRuns
from harness.workers.loopmodes import LOOP_MODES
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess
from scenarios.expect import (
    DOMAIN,
    assert_nothing_left_behind,
    assert_run_log,
    assert_shim_lines,
)

pytestmark = [pytest.mark.integration, pytest.mark.alternating]

RUNS: Final = 8
# The runs whose job retries a failed request (the marketplace's fail_first).
RETRIED: Final = (2, 5)
PROJECT_ID: Final = 100


def test_modes_alternate_on_one_worker(
    request: pytest.FixtureRequest,
    worker_pool: tuple[str, str],
    pool_worker: CeleryWorkerProcess,
    pool_runs: WorkerRuns,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    record_property: Any,
    harness_runner: str,
) -> None:
    selected = request.config.stash[harness_config_key].loop_modes
    modes = [m for m in LOOP_MODES if m in selected and mode_applies(m, worker_pool[0])]
    if not modes:
        pytest.skip("no worker loop mode is selected (--loop-mode)")
    pid = pool_worker.pid
    served = len(marketplace.expected(marketplace_code, DOMAIN))

    # One at a time, so each run starts after the previous one ended in the same process (for
    # prefork: in one of its children, each of which sees several runs of different modes).
    done = []
    for index, mode in enumerate(itertools.islice(itertools.cycle(modes), RUNS)):
        if index in RETRIED:
            # This run's first request answers 503: its job retries inside the same process,
            # on the same loop, and must still leave nothing behind for the next run.
            marketplace.configure(marketplace_code, fail_first=1)
        # One project: the first run inserts the rows, every later one updates them.
        run = pool_runs.run(mode, marketplace_code=marketplace_code, project_id=PROJECT_ID)
        if run.row.duration_ms is not None:
            record_property("run_duration_ms", run.row.duration_ms)
        done.append(run)

    lines = pool_runs.lines()
    statuses = marketplace.requests(marketplace_code).statuses()
    assert statuses.count(503) == len(RETRIED), (
        f"expected {len(RETRIED)} retried requests: {statuses}"
    )
    for run in done:
        assert_run_succeeded(
            run.row, log=lines, project_id=PROJECT_ID, domain=DOMAIN, fetched=served
        )
        assert_run_log(lines, run.run_id, run.loop_mode, runner=harness_runner)
        assert_shim_lines(lines, run.run_id, run.loop_mode)
        assert_nothing_left_behind(lines, run.run_id)
    assert pool_worker.pid == pid and pool_worker.is_alive(), (
        f"the {worker_pool[0]} worker was replaced during the runs (it died?): pid {pid} -> "
        f"{pool_worker.pid}, exit code {pool_worker.returncode}"
    )
