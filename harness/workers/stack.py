"""``FullStack``: the whole service on one machine, as the runbook needs it, in one context manager.

Postgres and Redis (the service layer, or ``Services`` someone already started), the Alembic
migrations, the marketplace source, a real Celery worker on a queue of its own, and the API and
UI served by uvicorn. ``python -m app`` (``make run``) runs one for a person; the runbook's
end-to-end scenarios run one per loop mode. Everything started is stopped in reverse order on
exit, and also when the start itself fails halfway.

Exceptions::

    RuntimeError
     └── PortInUseError     a fixed port (the API's, the marketplace's) is already taken;
                            raised before anything is started
    (plus whatever the part that failed raises: ServicesError, WorkerStartError, ...)
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Self, TypeVar

from harness.core._lifecycle import StartStop
from harness.core.errors import SetupError
from harness.core.runs import RunStore
from harness.core.target import ApiSettings, default_target
from harness.services import (
    ServiceMode,
    Services,
    ServiceStack,
    create_database,
    drop_database,
    mask_dsn,
)
from harness.workers.farm import CONCURRENCY
from harness.workers.http import ServerStartError, UvicornServer
from harness.workers.loopmodes import DEFAULT_MODE_ENV, LoopMode, parse_loop_mode
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess, app_env

__all__ = [
    "API_LOGGERS",
    "API_PART",
    "MARKETPLACE_PART",
    "RUNBOOK_PROJECT_ID",
    "FullStack",
    "PortInUseError",
    "check_port_free",
    "runbook_curl_lines",
]

logger = logging.getLogger("harness.stack")

T = TypeVar("T")

# The runbook's examples are all about project 1.
RUNBOOK_PROJECT_ID: Final = 1
# The parts that listen on fixed ports, as PortInUseError.what names them.
API_PART: Final = "the API and UI"
MARKETPLACE_PART: Final = "the marketplace source"
# What the API process logs (uvicorn's access and error lines, the app's own), into api.log.
API_LOGGERS: Final = ("uvicorn", "uvicorn.access", "app")
# uvicorn's own loggers do not propagate; their console handlers are replaced by the file while
# the stack runs, so a person's terminal (and pytest's output) shows only what is meant for it.
_REPLACED_HANDLERS: Final = ("uvicorn", "uvicorn.access")


class PortInUseError(SetupError):
    """``host:port`` is already taken; ``what`` says which part of the stack wanted it."""

    def __init__(self, what: str, host: str, port: int) -> None:
        super().__init__(
            f"{what} cannot listen on {host}:{port}: the address is already in use "
            "(another `make run` / `python -m app`?)"
        )
        self.what = what
        self.host = host
        self.port = port


def check_port_free(what: str, host: str, port: int) -> None:
    """Raise ``PortInUseError`` if something listens on ``host:port`` (0: any port, no check).

    Binds the way uvicorn does (SO_REUSEADDR), so a port left in TIME_WAIT by an earlier run
    counts as free, as it is for the server.
    """
    if port == 0:
        return
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(what, host, port) from None
            raise


def runbook_curl_lines(port: int, token: str, run_id: int | str = ":run_id") -> tuple[str, str]:
    """The runbook's two step-5 curl commands, for ``localhost:port`` and ``token``.

    As the runbook writes them, ``:run_id`` placeholder included unless a run id is given.
    """
    base = f"http://localhost:{port}/api/v1/projects/{RUNBOOK_PROJECT_ID}/ingest/runs"
    header = f'  -H "Authorization: Bearer {token}"'
    return (
        f'curl -X GET "{base}?limit=1" \\\n{header}',
        f'curl -X GET "{base}/{run_id}" \\\n{header}',
    )


class _ApiLog:
    """Sends the API's loggers to one file while the stack runs, then puts them back."""

    def __init__(self, path: Path, formatter: logging.Formatter) -> None:
        self.path = path
        self._handler = logging.FileHandler(path, encoding="utf-8")
        self._handler.setFormatter(formatter)
        self._saved: list[tuple[logging.Logger, list[logging.Handler], int]] = []

    def install(self) -> None:
        for name in API_LOGGERS:
            target = logging.getLogger(name)
            self._saved.append((target, list(target.handlers), target.level))
            if name in _REPLACED_HANDLERS:
                target.handlers = [self._handler]
            else:
                target.addHandler(self._handler)
            if target.level == logging.NOTSET or target.level > logging.INFO:
                target.setLevel(logging.INFO)

    def uninstall(self) -> None:
        while self._saved:
            target, handlers, level = self._saved.pop()
            target.handlers = handlers
            target.setLevel(level)
        self._handler.close()


class FullStack(StartStop):
    """Services, migrations, marketplace, worker and API+UI, started and stopped together.

    ``services``: a ``ServiceMode`` to start Postgres and Redis with the service layer (stopped
    at exit), or ``Services`` already running (left running). ``database``: with given
    services, a database of that name is created, used and dropped at exit (a stack of its own
    next to the session's); ``None`` uses ``services.postgres_url`` as it is.

    ``port`` / ``marketplace_port``: 0 picks free ports (tests), ``make run`` uses 8000 / 8081;
    a fixed port that is taken fails before anything starts (``PortInUseError``).

    ``loop_mode``: the worker's ``HARNESS_DEFAULT_LOOP_MODE``, the condition every run the API
    enqueues executes under (those messages carry no harness header); default: that variable
    from ``env``, else ``no_loop``. ``tokens``: API token to scope (``"*"`` or ``"1,2"``);
    default: one fresh ``secrets.token_urlsafe`` token for every project. Tokens are never
    logged and never passed to the worker.

    >>> with FullStack(services=session_services, database="runbook_x") as stack:  # doctest: +SKIP
    ...     httpx.get(stack.url + "/healthz")
    """

    def __init__(
        self,
        *,
        services: Services | ServiceMode = "auto",
        database: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        marketplace_port: int = 0,
        pool: str = "solo",
        concurrency: int | None = None,
        loop_mode: str | None = None,
        tokens: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        worker_settings: Mapping[str, str] | None = None,
        worker_start_timeout: float = 30.0,
    ) -> None:
        self._env: dict[str, str] = dict(os.environ if env is None else env)
        if database is not None and not isinstance(services, Services):
            raise ValueError(
                "database= names a database to create next to given Services; a stack that "
                "starts its own services already has a database of its own"
            )
        self.loop_mode: LoopMode = parse_loop_mode(
            loop_mode or self._env.get(DEFAULT_MODE_ENV, "").strip() or LoopMode.NO_LOOP.value
        )
        self._services_arg = services
        self._database_name = database
        self.host = host
        self._port = port
        self._marketplace_port = marketplace_port
        self.pool = pool
        self.concurrency = concurrency if concurrency is not None else CONCURRENCY.get(pool, 1)
        self._tokens: dict[str, str] = (
            dict(tokens) if tokens is not None else {secrets.token_urlsafe(32): "*"}
        )
        if not self._tokens:
            raise ValueError("tokens must hold at least one token (or be None for a fresh one)")
        for token, scope in self._tokens.items():
            if not token or any(c in token for c in "=; \t\n") or not scope:
                # The message names neither the token nor its position's value.
                raise ValueError(
                    "each token must be non-empty without '=', ';' or whitespace, with a scope "
                    "('*' or project ids like '1,2')"
                )
        self._log_dir_arg = log_dir
        self._worker_settings = dict(worker_settings or {})
        self._worker_start_timeout = worker_start_timeout
        self._target = default_target()

        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self._used = False
        self._services: Services | None = None
        self._database_url: str | None = None
        self._log_dir: Path | None = None
        self._marketplace: MarketplaceServer | None = None
        self._worker: CeleryWorkerProcess | None = None
        self._store: RunStore | None = None
        self._server: UvicornServer | None = None
        self._api_log: _ApiLog | None = None
        self.start_s: float | None = None

    def __repr__(self) -> str:
        # Never the tokens; the URLs only once running.
        state = f"api {self._server.url}" if self._server is not None else "not running"
        return f"<FullStack loop_mode={self.loop_mode.value} pool={self.pool} {state}>"

    # -- what it exposes ----------------------------------------------------------------------

    @staticmethod
    def _need(value: T | None, what: str) -> T:
        if value is None:
            raise RuntimeError(f"the stack has no {what}: start() it first (or it was stopped)")
        return value

    @property
    def services(self) -> Services:
        return self._need(self._services, "services")

    @property
    def database_url(self) -> str:
        """The migrated database the API and the worker use (may hold a password)."""
        return self._need(self._database_url, "database")

    @property
    def log_dir(self) -> Path:
        return self._need(self._log_dir, "log directory")

    @property
    def marketplace(self) -> MarketplaceServer:
        return self._need(self._marketplace, "marketplace")

    @property
    def worker(self) -> CeleryWorkerProcess:
        return self._need(self._worker, "worker")

    @property
    def store(self) -> RunStore:
        """``ingest_runs`` on the stack's own connection (not the API's, not the worker's)."""
        return self._need(self._store, "run store")

    @property
    def server(self) -> UvicornServer:
        return self._need(self._server, "API server")

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        """The API and UI: ``http://127.0.0.1:<port>``, no trailing slash."""
        return self.server.url

    @property
    def ui_url(self) -> str:
        """The runbook's ingestion page (project 1)."""
        return f"{self.url}/projects/{RUNBOOK_PROJECT_ID}/ingestion"

    @property
    def api_log_path(self) -> Path:
        """uvicorn's access and error lines and the app's own log lines."""
        return self._need(self._api_log, "API log").path

    @property
    def token(self) -> str:
        """The first token (the only one, unless ``tokens`` gave more)."""
        return next(iter(self._tokens))

    @property
    def tokens(self) -> dict[str, str]:
        """Every token with its scope."""
        return dict(self._tokens)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Start everything; on any failure stop what was started and re-raise."""
        if self._used:
            raise RuntimeError("a FullStack starts once; make a new one to start again")
        self._used = True
        started = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - started
        logger.info("stack ready in %.2f s: %s", self.start_s, self.describe())
        return self

    def stop(self) -> None:
        """Stop everything started, newest first. Idempotent; logs failures, never raises them."""
        while self._cleanups:
            name, undo = self._cleanups.pop()
            began = time.monotonic()
            try:
                undo()
            except Exception:
                logger.warning("stack: stopping %s failed", name, exc_info=True)
            else:
                logger.info("stack: stopped %s in %.2f s", name, time.monotonic() - began)
        self._server = None
        self._store = None
        self._worker = None
        self._marketplace = None

    def describe(self) -> str:
        """Every part on one line, "; "-separated: passwords masked, no token."""
        services = self.services
        return "; ".join(
            [
                f"services {services.backend} (postgres {services.postgres_version}, "
                f"redis {services.redis_version})",
                f"database {mask_dsn(self.database_url)}",
                f"marketplace {self.marketplace.url}",
                f"worker {self.worker.node_name} ({self.pool}, loop mode {self.loop_mode.value}, "
                f"queue {self.worker.queue}, log {self.worker.log_path})",
                f"api {self.url} (log {self.api_log_path})",
            ]
        )

    # -- internals ----------------------------------------------------------------------------

    def _push(self, name: str, undo: Callable[[], None]) -> None:
        self._cleanups.append((name, undo))

    def _start(self) -> None:
        # Fixed ports first: a taken port is the commonest failure, and finding it after
        # Postgres, Redis and a worker have started would waste seconds and print noise.
        check_port_free(API_PART, self.host, self._port)
        check_port_free(MARKETPLACE_PART, self.host, self._marketplace_port)

        self._log_dir = self._log_dir_arg or Path(tempfile.mkdtemp(prefix="ingest-run-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)

        services = self._start_services()
        database_url = self._prepare_database(services)

        marketplace = MarketplaceServer(self.host, self._marketplace_port)
        marketplace.start()
        self._push("the marketplace source", marketplace.stop)
        self._marketplace = marketplace

        worker = CeleryWorkerProcess(
            env=app_env(
                database_url=database_url,
                broker_url=services.redis_url,
                marketplace_url=marketplace.url,
                **self._worker_settings,
            ),
            log_dir=self._log_dir,
            pool=self.pool,
            concurrency=self.concurrency,
            # HARNESS_* is not inherited by the worker (harness.workers.process): set it explicitly.
            extra_env={DEFAULT_MODE_ENV: self.loop_mode.value},
            start_timeout=self._worker_start_timeout,
        )
        self._push("the worker", worker.stop)
        worker.start()
        self._worker = worker

        store = RunStore(database_url)
        self._push("the run store", store.close)
        self._store = store

        self._start_api(database_url, services.redis_url, marketplace.url, worker.queue)

    def _start_services(self) -> Services:
        if isinstance(self._services_arg, Services):
            self._services = self._services_arg
            return self._services
        stack = ServiceStack(self._services_arg, env=self._env)
        self._push("the services", stack.stop)
        self._services = stack.start()
        return self._services

    def _prepare_database(self, services: Services) -> str:
        if self._database_name is None:
            url = services.postgres_url
        else:
            admin_url, name = services.postgres_admin_url, self._database_name
            url = create_database(admin_url, name)
            self._push(f"database {name}", lambda: drop_database(admin_url, name))
        self._target.migrate_database(url)
        self._database_url = url
        return url

    def _start_api(
        self, database_url: str, broker_url: str, marketplace_url: str, queue: str
    ) -> None:
        app, release = self._target.api_factory()(
            ApiSettings(
                database_url=database_url,
                broker_url=broker_url,
                queue=queue,
                upstream_url=marketplace_url,
                tokens=self._tokens,
            )
        )
        # Constructed before the log is installed: uvicorn's Config applies its own logging
        # configuration right here, which would otherwise replace ours.
        server = UvicornServer(app, self.host, self._port, log_level="info")
        api_log = _ApiLog(self.log_dir / "api.log", self._target.logs.make_formatter())
        api_log.install()
        self._api_log = api_log
        self._push("the API log", api_log.uninstall)
        # What the API holds for this database (the app's engine): let it go with the API, so a
        # dropped database leaves no pooled connection behind.
        self._push("the API's database engine", release)
        self._push("the API server", server.stop)
        try:
            server.start()
        except ServerStartError:
            # Taken between the early check and now: say so as clearly as the early check.
            check_port_free(API_PART, self.host, self._port)
            raise
        self._server = server
