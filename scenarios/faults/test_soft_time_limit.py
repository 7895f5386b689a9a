"""6. The job passes Celery's soft time limit: the run is ``failed``, its error says it timed out,
``duration_ms`` is set; the worker stays alive.

The worker is prefork: only the prefork pool enforces time limits (its pool child gets SIGUSR1
and the task sees ``SoftTimeLimitExceeded``). Measured on this machine (docs/faults.md): solo
and threads ignore ``soft_time_limit=0.5`` and the held run succeeds after 2.4 s. The limit is
an ``apply_async`` option here (``soft_time_limit=``), as a caller may set it per task; the
service's own default is ``APP_SOFT_TIME_LIMIT_S``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Final

import pytest
from sqlalchemy import Engine

from harness.checks.assertions import assert_run_failed, assert_run_succeeded
from harness.checks.faults import (
    FaultWorkers,
    assert_fault_invariants,
    served_rows,
    start_held_run,
    wait_answers_ping,
)
from harness.core.runs import RunStore
from harness.pytest.plugin import add_failure_detail
from harness.services import Services
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess
from scenarios.expect import assert_shim_lines

pytestmark = pytest.mark.integration

PROJECT_ID: Final = 16
DOMAIN: Final = "frontend_prices"
SOFT_LIMIT_S: Final = 0.5
TIMED_OUT: Final = "SoftTimeLimitExceeded: the run timed out"
# Celery's own warning in the worker's log when the limit fires.
CELERY_WARNING: Final = f"Soft time limit ({SOFT_LIMIT_S}s) exceeded for"


@pytest.fixture(scope="module")
def module_workers(
    services: Services,
    fault_database_url: str,
    fault_engine: Engine,
    marketplace_server: MarketplaceServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FaultWorkers]:
    # One prefork worker for the module's cases: its start and stop are 2-3 s of the budget.
    with FaultWorkers(
        database_url=fault_database_url,
        broker_url=services.redis_url,
        marketplace_url=marketplace_server.url,
        log_dir=tmp_path_factory.mktemp("soft-time-limit"),
    ) as workers:
        _warm_up(workers.start(pool="prefork", concurrency=1), RunStore(fault_engine))
        yield workers
        marketplace_server.reset()


def _warm_up(worker: CeleryWorkerProcess, store: RunStore) -> None:
    """One run before the timed ones (its row is emptied with the tables before each test).

    A pool child's first run imports what the service loads lazily (the job modules, httpx,
    asyncpg): 0.1-0.3 s, more on a loaded machine, and the soft limit counts it. Without this
    the first test's run could time out before its first request to the held source (seen in
    a full `make test`), and the test would not have provoked what it checks.
    """
    run_id = store.create(project_id=PROJECT_ID, marketplace_code=f"warm-{uuid.uuid4().hex[:8]}")
    worker.send(run_id)
    row = store.wait_terminal(run_id)
    assert row.status == "success", f"the warm-up run did not succeed: {row}"


@pytest.fixture
def prefork(
    request: pytest.FixtureRequest, module_workers: FaultWorkers, fault_db: str
) -> Iterator[CeleryWorkerProcess]:
    del fault_db  # emptied for this test
    marks = module_workers.marks()
    add_failure_detail(request.node, lambda: ("worker log", module_workers.log_text(marks)))
    yield module_workers.workers[0]


@pytest.mark.parametrize("loop_mode", ["no_loop", "running_loop"])
def test_run_past_the_soft_time_limit_fails_as_timed_out(
    loop_mode: str,
    prefork: CeleryWorkerProcess,
    fault_store: RunStore,
    marketplace: MarketplaceServer,
) -> None:
    since = prefork.log_mark()
    # Its source is never released: only the limit can end it.
    run_id, _ = start_held_run(
        fault_store,
        prefork,
        marketplace,
        project_id=PROJECT_ID,
        loop_mode=loop_mode,
        soft_time_limit=SOFT_LIMIT_S,
    )

    row = fault_store.wait_terminal(run_id, timeout=10.0)

    lines = prefork.log_lines(since)
    assert_run_failed(row, error=TIMED_OUT, log=lines)
    assert row.duration_ms is not None and row.duration_ms >= SOFT_LIMIT_S * 1000 - 50, (
        f"the run ended after {row.duration_ms} ms, before its {SOFT_LIMIT_S} s limit"
    )
    assert row.stats_json is None
    assert any(CELERY_WARNING in line.headline for line in lines), "Celery did not say why"

    # The pool child survived its limit: the same worker runs the next run normally.
    wait_answers_ping(prefork)
    next_code = f"mp-{uuid.uuid4().hex[:8]}"
    next_run = fault_store.create(project_id=PROJECT_ID, marketplace_code=next_code)
    prefork.send(next_run, loop_mode=loop_mode, soft_time_limit=SOFT_LIMIT_S * 10)
    assert_run_succeeded(
        fault_store.wait_terminal(next_run),
        log=prefork.log_lines(since),
        project_id=PROJECT_ID,
        **marketplace.served_stats(next_code, DOMAIN),
    )
    assert_fault_invariants(
        fault_store,
        prefork.log_lines(since),
        expected_rows=served_rows(marketplace, next_code, project_id=PROJECT_ID),
    )
    # The harness's own lines: both runs were in the mode the cell names.
    for run in (run_id, next_run):
        assert_shim_lines(prefork.log_lines(since), run, loop_mode)
