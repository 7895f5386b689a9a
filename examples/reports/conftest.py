"""The report service's fixtures: thin wiring over the harness's fixtures
(``harness.pytest.fixtures``), with nothing but the app's Target. Its workers and its database
come from ``target_worker`` and ``target_database``; this file only adds the app's own insert."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

from examples.reports.target import REPORTS
from harness.pytest.fixtures import TargetDatabases, TargetWorkers
from harness.workers.process import CeleryWorkerProcess

TARGET_SPEC = "examples.reports.target:REPORTS"


@pytest.fixture(scope="session")
def reports_engine(target_database: TargetDatabases) -> Iterator[Engine]:
    """The report service's own database (made by its Target's migrate), on our connection."""
    engine = create_engine(target_database(REPORTS))
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def new_report(reports_engine: Engine) -> Callable[[str, str], int]:
    """Insert a pending report job; return its id."""

    def create(tenant: str, kind: str) -> int:
        with reports_engine.begin() as conn:
            job_id = conn.execute(
                text("INSERT INTO report_jobs (tenant, kind) VALUES (:t, :k) RETURNING id"),
                {"t": tenant, "k": kind},
            ).scalar_one()
        return int(job_id)

    return create


@pytest.fixture(scope="session")
def reports_workers(target_worker: TargetWorkers) -> Callable[[str, str], CeleryWorkerProcess]:
    """A started worker of the report service per (pool, runner)."""

    def get(pool: str, runner: str) -> CeleryWorkerProcess:
        return target_worker(pool, runner=runner, target=TARGET_SPEC)

    return get
