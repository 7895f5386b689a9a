"""ServiceStack: pick a backend for the mode, start Postgres + Redis, hand back `Services`.

``auto`` tries docker (if an engine answers), then the local binaries, then external URLs
(if both are set); the error when none works lists each one's reason and fix.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import get_args

from harness.services import _proc
from harness.services._admin import (
    create_database,
    postgres_server_version,
    redis_server_version,
)
from harness.services._base import (
    Backend,
    ProbeFn,
    ProbeResult,
    ServiceMode,
    Services,
    ServiceStartError,
    ServicesUnavailable,
)
from harness.services._compose import probe_compose, start_compose
from harness.services._docker import DockerImages, probe_docker, start_docker
from harness.services._external import AMQP_VAR, probe_external, start_external
from harness.services._local import LocalPostgres, LocalRedis, default_cache_dir, probe_local

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
_AUTO_ORDER: tuple[Backend, ...] = ("docker", "local", "external")
_DATABASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def resolve_amqp(env: Mapping[str, str], *, timeout: float = 0.2) -> str | None:
    """HARNESS_AMQP_URL if set; else the default local RabbitMQ if it accepts a connection."""
    if env.get(AMQP_VAR):
        return env[AMQP_VAR]
    return DEFAULT_AMQP_URL if _proc.tcp_answers("127.0.0.1", 5672, timeout) else None


class ServiceStack:
    """Postgres + Redis (+ the AMQP URL) for one test session, as a context manager.

    >>> with ServiceStack("local") as services:
    ...     engine = sqlalchemy.create_engine(services.postgres_url)

    `env` (default: os.environ, read once here) supplies HARNESS_*_URL, DOCKER_HOST, PATH,
    XDG_CACHE_HOME and PYTEST_XDIST_WORKER. `images` are the docker backend's (default:
    HARNESS_POSTGRES_IMAGE / HARNESS_REDIS_IMAGE, else the official images). `docker_probe` /
    `local_probe` replace the checks that decide whether a backend can work (for tests of the
    resolution itself).
    """

    def __init__(
        self,
        mode: ServiceMode = "auto",
        *,
        workdir: Path | None = None,
        env: Mapping[str, str] | None = None,
        database: str = "ingest",
        log: logging.Logger | None = None,
        docker_probe: ProbeFn | None = None,
        local_probe: ProbeFn | None = None,
        images: DockerImages | None = None,
    ) -> None:
        if mode not in get_args(ServiceMode):
            raise ValueError(
                f"unknown services mode {mode!r}; use one of: {', '.join(get_args(ServiceMode))}"
            )
        if not _DATABASE_NAME.fullmatch(database):
            raise ValueError(
                f"database name {database!r} must be a plain identifier "
                "(letters, digits, underscores; at most 40 characters)"
            )
        self.mode: ServiceMode = mode
        self.database = database
        self._workdir = workdir
        self._env: dict[str, str] = dict(os.environ if env is None else env)
        self.images = images or DockerImages.from_env(self._env)
        self._log = log or _proc.log
        self._probes: dict[Backend, ProbeFn] = {
            "docker": docker_probe or probe_docker,
            "local": local_probe or probe_local,
            "external": probe_external,
            "compose": probe_compose,
        }
        # (name, undo) in start order; stop() pops from the end, so each runs once even when
        # stop() re-enters (a signal handler) or runs twice.
        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self._services: Services | None = None

    @property
    def services(self) -> Services | None:
        """The running services, or None before start / after stop."""
        return self._services

    def start(self) -> Services:
        """Start the services (once; later calls return the same). Cleans up if it fails."""
        if self._services is not None:
            return self._services
        _proc.track(self, self.stop)
        try:
            self._services = self._start()
        except BaseException:
            self.stop()
            raise
        self._log.info("%s", self._services.describe())
        return self._services

    def stop(self) -> None:
        """Stop everything started, newest first. Idempotent; logs failures, never raises."""
        self._services = None
        while self._cleanups:
            try:
                name, undo = self._cleanups.pop()
            except IndexError:  # emptied by a re-entrant call between the check and the pop
                break
            try:
                undo()
            except Exception:
                self._log.warning("services: cleaning up %s failed", name, exc_info=True)
        _proc.untrack(self)

    def __enter__(self) -> Services:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals --

    def _push(self, name: str, undo: Callable[[], None]) -> None:
        self._cleanups.append((name, undo))

    def _start(self) -> Services:
        order: tuple[Backend, ...] = _AUTO_ORDER if self.mode == "auto" else (self.mode,)
        attempts: list[ProbeResult] = []
        last_error: Exception | None = None
        for backend in order:
            probe = self._probes[backend](self._env)
            if not probe.ok:
                self._log.debug("services: %s unavailable: %s", backend, probe.detail)
                attempts.append(probe)
                continue
            try:
                return self._start_backend(backend)
            except Exception as exc:
                if self.mode != "auto":
                    raise
                # Undo this backend's half-start before trying the next one.
                self.stop()
                _proc.track(self, self.stop)
                self._log.warning("services: %s backend failed, trying the next: %s", backend, exc)
                detail = f"{probe.detail}, but starting failed: {exc}"
                attempts.append(ProbeResult(backend, False, detail, probe.fix))
                last_error = exc
        raise ServicesUnavailable(self.mode, attempts) from last_error

    def _start_backend(self, backend: Backend) -> Services:
        if backend == "local":
            return self._start_local()
        if backend == "docker":
            return self._start_docker()
        if backend == "compose":
            c = start_compose(self._env, self.database, self._push, self._log)
            return dataclasses.replace(
                self._services_of(
                    "compose",
                    c.postgres_url,
                    c.postgres_admin_url,
                    c.redis_url,
                    c.postgres_version,
                    c.redis_version,
                ),
                amqp_url=c.amqp_url,
                images=c.images,
            )
        pg_url, admin_url, redis_url, pg_version, redis_version = start_external(
            self._env, self.database, self._push, self._log
        )
        return self._services_of(
            "external", pg_url, admin_url, redis_url, pg_version, redis_version
        )

    def _start_local(self) -> Services:
        pg = LocalPostgres(
            workdir=self._workdir,
            cache_dir=default_cache_dir(self._env),
            env=self._env,
            log=self._log,
        )
        self._push("local postgres", pg.stop)
        pg.start()
        rd = LocalRedis(workdir=self._workdir, env=self._env, log=self._log)
        self._push("local redis", rd.stop)
        rd.start()
        # No drop needed: the database goes with the cluster.
        postgres_url = create_database(pg.admin_url, self.database)
        return self._services_of(
            "local", postgres_url, pg.admin_url, rd.url, pg.version, rd.version
        )

    def _start_docker(self) -> Services:
        started = start_docker(self.images, self._push, self._log, self._env)
        try:
            pg_version = postgres_server_version(started.postgres_admin_url)
            redis_version = redis_server_version(started.redis_url)
            # No drop needed: the database goes with the container.
            postgres_url = create_database(started.postgres_admin_url, self.database)
        except Exception as exc:
            raise ServiceStartError(
                f"the docker servers started but do not answer queries: {exc}",
                checked=[f"images: {', '.join(started.images.values())}"],
                fix="read the container logs (`docker logs <id>`)",
            ) from exc
        services = self._services_of(
            "docker",
            postgres_url,
            started.postgres_admin_url,
            started.redis_url,
            pg_version,
            redis_version,
        )
        return dataclasses.replace(services, images=started.images)

    def _services_of(
        self,
        backend: Backend,
        pg_url: str,
        admin_url: str,
        redis_url: str,
        pg_version: str,
        redis_version: str,
    ) -> Services:
        """The started servers, plus the AMQP broker this environment has (if any)."""
        return Services(
            backend=backend,
            postgres_url=pg_url,
            postgres_admin_url=admin_url,
            redis_url=redis_url,
            amqp_url=resolve_amqp(self._env),
            postgres_version=pg_version,
            redis_version=redis_version,
        )
