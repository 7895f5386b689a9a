"""The report service's fixtures: its own database next to the session's services, and one
Celery worker per (pool, runner), all from harness pieces and the app's Target alone."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from examples.reports.target import REPORTS
from harness.services import Services, create_database, drop_database
from harness.workers.process import CeleryWorkerProcess

TARGET_SPEC = "examples.reports.target:REPORTS"


@pytest.fixture(scope="session")
def reports_db(services: Services) -> Iterator[str]:
    """A database of the report service's own, made by its Target's migrate."""
    name = f"reports_{secrets.token_hex(4)}"
    url = create_database(services.postgres_admin_url, name)
    try:
        REPORTS.migrate_database(url)
        yield url
    finally:
        drop_database(services.postgres_admin_url, name)


@pytest.fixture(scope="session")
def reports_engine(reports_db: str) -> Iterator[Engine]:
    engine = create_engine(reports_db)
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
def reports_workers(
    services: Services, reports_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str, str], CeleryWorkerProcess]]:
    """A started worker per (pool, runner), on first use; all stopped at the session's end."""
    log_dir: Path = tmp_path_factory.mktemp("reports-workers")
    started: dict[tuple[str, str], CeleryWorkerProcess] = {}

    def get(pool: str, runner: str) -> CeleryWorkerProcess:
        if (pool, runner) not in started:
            worker = CeleryWorkerProcess(
                env=REPORTS.app_env(database_url=reports_db, broker_url=services.redis_url),
                log_dir=log_dir,
                pool=pool,
                concurrency=1,
                extra_env={"HARNESS_RUNNER": runner},
                target=TARGET_SPEC,
            )
            started[(pool, runner)] = worker
            worker.start()
        return started[(pool, runner)]

    try:
        yield get
    finally:
        for worker in started.values():
            worker.stop()
