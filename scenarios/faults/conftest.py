"""Fixtures of the fault scenarios: a database of their own, a run store, dedicated workers.

The fault scenarios kill workers, stop them, restart Redis and terminate every connection of
their database, so nothing of theirs is shared with the other scenarios: the database is their
own (one per session and xdist worker, emptied before each test), and so are the workers
(``harness.checks.faults.FaultWorkers``, never the farm's). The session's Postgres cluster, Redis
and marketplace are reused: starting them is the expensive part, and nothing here harms them.
"""

from __future__ import annotations

import os
import secrets
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from harness.checks.faults import FaultWorkers
from harness.core.runs import RunStore
from harness.pytest.plugin import add_failure_detail
from harness.services import Services, create_database, drop_database
from harness.workers.marketplace import MarketplaceServer

_TABLES = "ingest_runs, frontend_prices, stocks"


@pytest.fixture(scope="session")
def fault_database_url(services: Services) -> Iterator[str]:
    """A migrated database only the fault scenarios use (``pg_terminate_backend`` hits it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"faults_{worker}_{secrets.token_hex(4)}"
    url = create_database(services.postgres_admin_url, name)
    try:
        # Lazy: Alembic would add to every pytest process's (and xdist worker's) start.
        from app.migrations import upgrade

        upgrade(url)
        yield url
    finally:
        drop_database(services.postgres_admin_url, name)


@pytest.fixture(scope="session")
def fault_engine(fault_database_url: str) -> Iterator[Engine]:
    # pre_ping: the scenario that terminates every backend of the database ends ours too.
    engine = create_engine(fault_database_url, pool_pre_ping=True, pool_size=2, max_overflow=4)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def fault_db(fault_database_url: str, fault_engine: Engine) -> str:
    """The fault database, every table emptied (ids restart) before the test; its URL."""
    with fault_engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {_TABLES} RESTART IDENTITY"))
    return fault_database_url


@pytest.fixture
def fault_store(request: pytest.FixtureRequest, fault_db: str, fault_engine: Engine) -> RunStore:
    """``ingest_runs`` of the fault database, on the harness's own connections."""
    store = RunStore(fault_engine)
    add_failure_detail(request.node, lambda: ("ingest_runs rows", _rows_text(fault_engine)))
    return store


def _rows_text(engine: Engine) -> str:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM ingest_runs ORDER BY id")).mappings().all()
    return "\n".join(repr(dict(row)) for row in rows) or "(no run)"


@pytest.fixture
def fault_broker_url(services: Services) -> str:
    """The broker of the test's fault workers: the session's Redis, in a database of this xdist
    worker's own (a module may override it).

    `harness matrix` and `harness stress` share one Redis between their xdist workers, and
    kombu keeps one index of unacknowledged messages per Redis database: a redelivery
    scenario's worker (a 1 s visibility timeout) would hand back the other xdist worker's
    unacknowledged messages too.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    parts = urllib.parse.urlsplit(services.redis_url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{1 + index % 15}"))


@pytest.fixture
def fault_workers(
    request: pytest.FixtureRequest,
    fault_broker_url: str,
    fault_db: str,
    marketplace: MarketplaceServer,
    tmp_path: Path,
) -> Iterator[FaultWorkers]:
    """Dedicated workers for one test; all stopped after it, their logs kept for a failure."""
    with FaultWorkers(
        database_url=fault_db,
        broker_url=fault_broker_url,
        marketplace_url=marketplace.url,
        log_dir=tmp_path,
    ) as workers:
        add_failure_detail(request.node, lambda: ("fault workers' logs", workers.log_text()))
        yield workers
        # Before the workers stop: a run the test left held would make a warm shutdown wait.
        marketplace.reset()
