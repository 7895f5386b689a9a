"""A Target: everything the harness assumes about the Celery app it tests, in one frozen object.

A project points the harness at its app with one module that builds a :class:`Target`, named
by ``harness_target = package.module:NAME`` in its pytest ini (or ``HARNESS_TARGET``). The
harness then knows, from that object only:

- the Celery app and the task a run is (``celery_app``, ``task_name``), and the runner the task
  calls its coroutine through, which ``--runner prefix`` swaps for a plain ``asyncio.run``
  (``runner``: the module attribute the task looks up at call time);
- the environment the app reads its URLs from (``env_prefix``, ``broker_url_env``,
  ``database_url_env``) and the quick settings a test worker gets (``worker_env``);
- how its schema is made (``migrate``: a function of a database URL);
- its runs' table (:class:`RunTable`): the columns, the status column and its terminal values;
- its log contract (:class:`LogContract`): the loggers and message templates of the task's
  and the runner's lines.

Strings name the app's objects (``module:attribute``), so that a Target is cheap to build, can
cross into a worker process as one environment variable, and imports the app only where it
runs. The harness's own worker app (``harness.workers.worker_app``) loads the Target named by
``HARNESS_TARGET``.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from sqlalchemy import Engine, text

from harness.core.errors import UsageError

__all__ = [
    "TARGET_ENV",
    "TARGET_INI",
    "ApiFactory",
    "ApiSettings",
    "LogContract",
    "RunTable",
    "Target",
    "TargetError",
    "default_target",
    "default_target_spec",
    "load_target",
    "resolve",
]

TARGET_ENV: Final = "HARNESS_TARGET"
TARGET_INI: Final = "harness_target"
_SPEC_RE: Final = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TargetError(UsageError):
    """No Target, or one that cannot be loaded: the message names where it was looked for."""


def resolve(spec: str) -> Any:
    """The object ``module:attribute`` names, imported now."""
    if not _SPEC_RE.match(spec):
        raise TargetError(f"{spec!r} does not name an object; use package.module:NAME")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(f"{spec!r}: cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise TargetError(f"{spec!r}: {module_name} has no attribute {attr!r}") from None


@dataclass(frozen=True)
class RunTable:
    """The table a run is a row of, as the harness reads it back."""

    table: str
    columns: tuple[str, ...]
    id: str = "id"
    status: str = "status"
    terminal: tuple[str, ...] = ("success", "failed")
    success: str = "success"
    # What the harness inserts for a new run, as the app does; ``RunStore.create`` adds to it.
    insert: Mapping[str, object] = field(default_factory=dict)
    # The error column, and the prefix of the message the app's own recovery (an unlock of
    # stale runs) writes there: the fault checks count such runs as recovered, not lost.
    error: str | None = None
    recovered_prefix: str | None = None

    def __post_init__(self) -> None:
        names = (self.table, *self.columns)
        bad = [n for n in names if not re.fullmatch(r"[a-z_][a-z0-9_]*", n)]
        if bad:
            raise TargetError(f"RunTable: {bad} are not plain lower-case SQL names")
        named = (self.id, self.status, *self.insert, *([self.error] if self.error else []))
        missing = [c for c in named if c not in self.columns]
        if missing:
            raise TargetError(f"RunTable {self.table}: columns lack {missing}")
        object.__setattr__(self, "insert", MappingProxyType(dict(self.insert)))

    def read(self, engine: Engine, run_id: int) -> dict[str, Any] | None:
        """The row of ``run_id`` as stored now, column by column; None if there is none."""
        sql = text(f"SELECT {', '.join(self.columns)} FROM {self.table} WHERE {self.id} = :run_id")
        with engine.connect() as conn:
            row = conn.execute(sql, {"run_id": run_id}).mappings().first()
        return None if row is None else dict(row)

    def is_terminal(self, row: Mapping[str, Any]) -> bool:
        return row[self.status] in self.terminal


@dataclass(frozen=True)
class LogContract:
    """The app's log lines about one run: loggers and message templates (``{run_id}``; the
    failure's also ``{error}``); ``runner_logger`` writes the runner's line."""

    task_logger: str
    runner_logger: str
    starting: str
    completed: str
    failed: str
    # ``package.module:NAME`` of a function returning the app's log Formatter (its line format),
    # for logs the harness writes on the app's behalf (the full stack's API log).
    formatter: str | None = None

    def make_formatter(self) -> logging.Formatter:
        if self.formatter is None:
            return logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
        factory: Callable[[], logging.Formatter] = resolve(self.formatter)
        return factory()

    def run_lines(self, lines: Any, run_id: int) -> list[Any]:
        """The task logger's lines about ``run_id`` (starting, completed, failed), in order."""
        heads = (self.starting.format(run_id=run_id), self.completed.format(run_id=run_id))
        failed = self.failed.format(run_id=run_id, error="")
        return [
            line
            for line in lines
            if line.logger == self.task_logger
            and (line.headline in heads or line.headline.startswith(failed))
        ]


@dataclass(frozen=True)
class ApiSettings:
    """What the harness's stack gives the app's API factory (``Target.api``)."""

    database_url: str
    broker_url: str
    # The queue the stack's worker consumes: the API must send its runs there.
    queue: str
    # The upstream the runs fetch from (the harness's marketplace).
    upstream_url: str
    # Bearer token -> scope ("*" or project ids), as the API is to accept them.
    tokens: Mapping[str, str]


# An ASGI app and the function that releases what it holds (engines, pools) once it stops.
ApiFactory = Callable[[ApiSettings], "tuple[Any, Callable[[], None]]"]


@dataclass(frozen=True)
class Target:
    """What the harness assumes about one Celery app (see the module's docstring)."""

    name: str
    celery_app: str
    task_name: str
    runner: str
    env_prefix: str
    broker_url_env: str
    database_url_env: str
    migrate: str
    runs: RunTable
    logs: LogContract
    worker_env: Mapping[str, str] = field(default_factory=dict)
    # The tables ``clean_db`` empties before a test; the runs' table when not given.
    reset_tables: tuple[str, ...] = ()
    # The variable the app reads its upstream's URL from (the harness's marketplace), if any.
    upstream_url_env: str | None = None
    # The app's HTTP API for the harness's full stack (``python -m app``, the runbook scenarios):
    # ``package.module:NAME`` of an :data:`ApiFactory`. None: the app has no API to start.
    api: str | None = None
    # ``package.module:NAME`` of a function that checks the app's own settings in this
    # environment before anything starts: it returns a one-line problem, or None.
    check_settings: str | None = None
    # The tables a run writes its data to, each with its business key: after any fault, no key
    # may be stored twice (harness.checks.faults.assert_fault_invariants).
    data_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Modules the app's worker imports that are safe to import before the app's settings exist
    # (its libraries: an ORM, a settings library, an HTTP client, a database driver): the
    # harness's fork server imports them once, and every worker it forks has them already
    # (harness.workers.forkserver). Never the app's own modules: they may read settings.
    worker_preload: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.reset_tables:
            object.__setattr__(self, "reset_tables", (self.runs.table,))
        bad = [n for n in self.reset_tables if not re.fullmatch(r"[a-z_][a-z0-9_]*", n)]
        if bad:
            raise TargetError(f"Target {self.name}: reset_tables {bad} are not plain SQL names")
        for name in ("celery_app", "runner", "migrate", "api", "check_settings"):
            value = getattr(self, name)
            if value is not None and not _SPEC_RE.match(value):
                raise TargetError(f"Target {self.name}: {name} must be 'package.module:NAME'")
        for name in ("broker_url_env", "database_url_env", "upstream_url_env"):
            value = getattr(self, name)
            if value is not None and not value.startswith(self.env_prefix):
                raise TargetError(f"Target {self.name}: {name} must start with {self.env_prefix}")
        bad = [m for m in self.worker_preload if not re.fullmatch(r"[A-Za-z_][\w.]*", m)]
        if bad:
            raise TargetError(f"Target {self.name}: worker_preload {bad} are not module names")
        object.__setattr__(self, "worker_env", MappingProxyType(dict(self.worker_env)))
        object.__setattr__(self, "data_keys", MappingProxyType(dict(self.data_keys)))

    def app_env(self, *, database_url: str, broker_url: str, **overrides: str) -> dict[str, str]:
        """The app's environment for a test worker: its URLs, its quick settings, overrides."""
        env = {self.database_url_env: database_url, self.broker_url_env: broker_url}
        env.update(self.worker_env)
        env.update(overrides)
        return env

    def import_roots(self, spec: str) -> tuple[str, ...]:
        """The path entries a fresh process needs to import this Target (``spec``), its Celery
        app and its runner: where each top-level package was found here, when that is not on
        the path by default (a checkout, not an installed package)."""
        default = {os.path.realpath(p) for p in _default_path()}
        roots: list[str] = []
        for name in (spec, self.celery_app, self.runner, self.migrate):
            top = name.split(":")[0].split(".")[0]
            found = importlib.util.find_spec(top)
            locations = list(found.submodule_search_locations or []) if found else []
            if found is not None and found.origin and not locations:
                locations = [found.origin]
            for location in locations:
                root = os.path.dirname(os.path.realpath(location))
                if root not in default and root not in roots:
                    roots.append(root)
        return tuple(roots)

    def pythonpath(self, spec: str, inherited: str | None) -> str | None:
        """``PYTHONPATH`` for a child process that must import this Target: its
        :meth:`import_roots` first, then ``inherited``; None when nothing needs adding."""
        roots = self.import_roots(spec)
        if not roots:
            return inherited
        kept = [p for p in (inherited or "").split(os.pathsep) if p]
        return os.pathsep.join(dict.fromkeys([*roots, *kept]))

    def api_factory(self) -> ApiFactory:
        """The app's API factory (``api``); TargetError if the Target names none."""
        if self.api is None:
            raise TargetError(f"Target {self.name} has no api: the full stack cannot start it")
        factory: ApiFactory = resolve(self.api)
        return factory

    def settings_problem(self) -> str | None:
        """What is wrong with the app's settings here (``check_settings``), or None."""
        if self.check_settings is None:
            return None
        check: Callable[[], str | None] = resolve(self.check_settings)
        return check()

    def migrate_database(self, database_url: str) -> None:
        """Bring the app's schema up to date in ``database_url``."""
        migrate: Callable[[str], None] = resolve(self.migrate)
        migrate(database_url)


def _default_path() -> list[str]:
    """sys.path without the entries this process was given (PYTHONPATH, the script's folder,
    pytest's ``pythonpath``): the site-packages and stdlib a new interpreter has anyway."""
    import site
    import sysconfig

    paths = [sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    return [*paths, *site.getsitepackages()]


def load_target(spec: str) -> Target:
    """The :class:`Target` that ``spec`` (``package.module:NAME``) names."""
    target = resolve(spec)
    if not isinstance(target, Target):
        raise TargetError(f"{spec!r} is a {type(target).__name__}, not a harness Target")
    return target


def _ini_target(root: Path) -> str | None:
    """``harness_target`` in ``root``'s pytest.ini; its ``pythonpath`` entries are put on
    sys.path, as pytest does, so that a harness command outside pytest imports the same."""
    ini = root / "pytest.ini"
    if not ini.is_file():
        return None
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ini, encoding="utf-8")
    value = parser.get("pytest", TARGET_INI, fallback="").strip()
    for entry in reversed(parser.get("pytest", "pythonpath", fallback="").split()):
        path = str((root / entry).resolve())
        if path not in sys.path:
            sys.path.insert(0, path)
    return value or None


def default_target_spec(env: Mapping[str, str] | None = None, root: Path | None = None) -> str:
    """This project's Target, as named: ``HARNESS_TARGET``, else ``harness_target`` in the
    pytest.ini of ``root`` (default: the working directory)."""
    environ = os.environ if env is None else env
    spec = environ.get(TARGET_ENV, "").strip() or _ini_target(root or Path.cwd())
    if not spec:
        raise TargetError(
            f"no harness Target: set {TARGET_INI} = package.module:NAME in pytest.ini "
            f"(or {TARGET_ENV}) to the Target of your Celery app (docs/own-app.md)"
        )
    return spec


def default_target(env: Mapping[str, str] | None = None, root: Path | None = None) -> Target:
    """The :class:`Target` that :func:`default_target_spec` names."""
    return load_target(default_target_spec(env, root))
