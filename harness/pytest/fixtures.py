"""The harness's fixtures, for any project whose pytest ini names a Target (``harness_target``).

The plugin registers this module only in such a project, so ``pytest --fixtures`` lists these
there and nowhere else. Each is a factory over the session's Target and services; a project's
own fixtures (an upstream it fakes, rows it inserts) are thin wiring over them:

- ``harness_target``: the session's :class:`~harness.core.target.Target`;
- ``services``, ``redis_url``, ``database_url``, ``clean_db``: real Postgres and Redis for the
  session, the Target's schema migrated, its tables emptied before a test;
- ``harness_runner``: ``--runner``, the runner the workers use;
- ``matrix_cell``, ``worker_pool``: the cell or (pool, broker) the plugin parametrized;
- ``target_database``: a migrated database of its own for another Target;
- ``target_worker``: a real ``celery worker`` of a Target, started on first use, stopped at the
  session's end.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, create_engine

from harness.core.cell import CELL_PROPERTY, Cell
from harness.core.errors import UsageError
from harness.core.runs import reset_tables
from harness.core.target import Target, default_target, default_target_spec, load_target
from harness.pytest import reports
from harness.pytest.stash import harness_config_key
from harness.services import DockerImages, Services, ServiceStack, create_database, drop_database
from harness.workers.process import CeleryWorkerProcess

__all__ = ["TargetDatabases", "TargetWorkers"]


@pytest.fixture(scope="session")
def harness_target() -> Target:
    """The Target this session tests: ``harness_target`` in the ini, or ``HARNESS_TARGET``."""
    return default_target()


@pytest.fixture(scope="session")
def harness_runner(request: pytest.FixtureRequest) -> str:
    """The runner the workers use (``--runner``): ``fixed``, or ``prefix`` (the pre-fix one)."""
    return request.config.stash[harness_config_key].runner


@pytest.fixture(scope="session")
def services(request: pytest.FixtureRequest) -> Iterator[Services]:
    """Real Postgres and Redis for the session (per xdist worker), from ``--services``; stopped,
    with everything they wrote, at the session's end."""
    config = request.config.stash[harness_config_key]
    images = DockerImages(postgres=config.postgres_image, redis=config.redis_image)
    with ServiceStack(config.services, env=config.env, images=images) as started:
        reports.note_services(request.config, started)
        yield started


@pytest.fixture(scope="session")
def redis_url(services: Services) -> str:
    """The session's Redis (the ``redis`` broker)."""
    return services.redis_url


@pytest.fixture(scope="session")
def database_url(services: Services, harness_target: Target) -> str:
    """The session's database, its schema made by the Target's ``migrate``."""
    harness_target.migrate_database(services.postgres_url)
    return services.postgres_url


@pytest.fixture(scope="session")
def _reset_engine(database_url: str) -> Iterator[Engine]:
    """One connection for every test's reset: a new engine and connection per test cost ~9 ms
    (more than the reset). Pinged before use: a fault scenario may have restarted Postgres."""
    engine = create_engine(database_url, pool_size=1, max_overflow=1, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture
def clean_db(database_url: str, harness_target: Target, _reset_engine: Engine) -> str:
    """The session's database with the Target's tables (``reset_tables``) emptied, ids
    restarted, before the test."""
    reset_tables(_reset_engine, harness_target.reset_tables)
    return database_url


@pytest.fixture
def matrix_cell(request: pytest.FixtureRequest, record_property: Any) -> Cell:
    """The (loop mode, pool, broker) cell the plugin parametrized the test over; recorded as a
    property for ``harness matrix``'s report."""
    cell = Cell(*cast(tuple[str, str, str], tuple(request.param)))
    record_property(CELL_PROPERTY, cell.property_value)
    return cell


@pytest.fixture
def worker_pool(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(pool, broker), parametrized by the plugin over the selected pools and brokers."""
    return cast(tuple[str, str], tuple(request.param))


class TargetDatabases:
    """``target_database(target)``: a database of its own for a Target, made by its migrate;
    the session's Target gets the session's ``database_url``."""

    def __init__(self, services: Services, request: pytest.FixtureRequest) -> None:
        self._services = services
        self._request = request
        self._made: dict[str, tuple[str, str]] = {}  # Target name -> (database, URL)

    def __call__(self, target: Target) -> str:
        if target == self._request.getfixturevalue("harness_target"):
            return cast(str, self._request.getfixturevalue("database_url"))
        if target.name not in self._made:
            name = f"{target.name}_{secrets.token_hex(4)}"
            url = create_database(self._services.postgres_admin_url, name)
            self._made[target.name] = (name, url)
            target.migrate_database(url)
        return self._made[target.name][1]

    def drop_all(self) -> None:
        for name, _ in self._made.values():
            drop_database(self._services.postgres_admin_url, name)
        self._made.clear()


@pytest.fixture(scope="session")
def target_database(
    services: Services, request: pytest.FixtureRequest
) -> Iterator[TargetDatabases]:
    """``target_database(target) -> URL``: a database of that Target's own, migrated, dropped at
    the session's end (a second app in the session); for the session's Target, ``database_url``."""
    databases = TargetDatabases(services, request)
    try:
        yield databases
    finally:
        databases.drop_all()


class TargetWorkers:
    """``target_worker(pool, ...)``: a started worker, one per distinct set of arguments."""

    def __init__(
        self, services: Services, databases: TargetDatabases, runner: str, log_dir: Path
    ) -> None:
        self._services = services
        self._databases = databases
        self._runner = runner
        self._log_dir = log_dir
        self._started: dict[tuple[object, ...], CeleryWorkerProcess] = {}

    def __call__(
        self,
        pool: str = "prefork",
        *,
        broker: str = "redis",
        runner: str | None = None,
        target: str | None = None,
        concurrency: int = 1,
        env: Mapping[str, str] | None = None,
    ) -> CeleryWorkerProcess:
        spec = target or default_target_spec()
        extra = dict(env or {})
        chosen = runner or self._runner
        key = (
            spec,
            pool,
            broker,
            chosen,
            concurrency,
            tuple(sorted(extra.items())),
        )
        if key not in self._started:
            loaded = load_target(spec)
            worker = CeleryWorkerProcess(
                env=loaded.app_env(
                    database_url=self._databases(loaded),
                    broker_url=self._broker_url(broker),
                    **extra,
                ),
                log_dir=self._log_dir,
                pool=pool,
                concurrency=concurrency,
                extra_env={"HARNESS_RUNNER": chosen},
                target=spec,
            )
            self._started[key] = worker
            worker.start()
        return self._started[key]

    def _broker_url(self, broker: str) -> str:
        if broker == "redis":
            return self._services.redis_url
        if broker == "amqp" and self._services.amqp_url:
            return self._services.amqp_url
        raise UsageError(
            f"target_worker(broker={broker!r}): this session has no such broker; "
            "use 'redis', or 'amqp' with HARNESS_AMQP_URL set"
        )

    def stop_all(self) -> None:
        for worker in self._started.values():
            worker.stop()
        self._started.clear()


@pytest.fixture(scope="session")
def target_worker(
    services: Services,
    target_database: TargetDatabases,
    harness_runner: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TargetWorkers]:
    """``target_worker(pool="prefork", *, broker="redis", runner=None, target=None,
    concurrency=1, env=None)``: a real ``celery worker`` of ``target`` (a Target's
    ``package.module:NAME``; default the session's), on a migrated database of that Target's own
    and the session's broker, started (ready on a control ping) on first use and stopped at the
    session's end. ``runner`` defaults to ``--runner``."""
    workers = TargetWorkers(
        services, target_database, harness_runner, tmp_path_factory.mktemp("target-workers")
    )
    try:
        yield workers
    finally:
        workers.stop_all()
