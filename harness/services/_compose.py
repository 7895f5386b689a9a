"""The services of ``docker-compose.test.yml``: bring them up, find them, run sessions on them.

``harness compose up`` starts the file's project and waits until every service is healthy (the
v1 CLI has no ``--wait``); ``--services=compose`` then finds the project's containers through the
engine, reads the loopback ports the engine chose, and runs each session in a database of its
own, as the external backend does; ``harness compose down`` removes the project with its volumes.
The names, ports and credentials below are the file's: tests/test_compose.py keeps the two equal.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from harness.core.poll import poll_until
from harness.services._base import ProbeResult, ServicesError, ServiceStartError
from harness.services._docker import (
    container_log_tail,
    docker_client,
    docker_host,
    image_version,
    probe_docker,
)
from harness.services._external import DATABASE_VAR, REDIS_VAR, start_external

COMPOSE_FILE: Final = "docker-compose.test.yml"
COMPOSE_FILE_VAR: Final = "HARNESS_COMPOSE_FILE"
COMPOSE_PROJECT_VAR: Final = "HARNESS_COMPOSE_PROJECT"
COMPOSE_PROJECT: Final = "ingest-harness-test"
# service -> its port inside the container; the host side is the engine's choice on 127.0.0.1
# unless HARNESS_COMPOSE_<SERVICE>_PORT asks for one.
COMPOSE_PORTS: Final = {"postgres": 5432, "redis": 6379, "rabbitmq": 5672}
POSTGRES_USER: Final = "harness"
POSTGRES_PASSWORD: Final = "harness"
POSTGRES_DB: Final = "harness"
RABBITMQ_USER: Final = "harness"
RABBITMQ_PASSWORD: Final = "harness"
_LABEL_PROJECT: Final = "com.docker.compose.project"
_LABEL_SERVICE: Final = "com.docker.compose.service"
_HEALTHY_TIMEOUT_S: Final = 120.0
_POLL_S: Final = 0.25
_LOG_TAIL: Final = 20
_UP_FIX: Final = "bring the project up with `harness compose up` (it waits until it is healthy)"


def project_name(env: Mapping[str, str]) -> str:
    return env.get(COMPOSE_PROJECT_VAR) or COMPOSE_PROJECT


def compose_file(env: Mapping[str, str], cwd: Path | None = None) -> Path:
    return Path(env.get(COMPOSE_FILE_VAR) or (cwd or Path.cwd()) / COMPOSE_FILE)


@dataclass(frozen=True)
class Endpoint:
    """One service of the running project."""

    service: str
    container: str
    health: str  # healthy | starting | unhealthy | none (no healthcheck) | the state if not running
    host: str
    port: int | None
    image: str


def _endpoint(container: Any) -> Endpoint:
    service = container.labels.get(_LABEL_SERVICE, "?")
    state = container.attrs.get("State", {})
    health = (
        state.get("Health", {}).get("Status", "none")
        if state.get("Running")
        else state.get("Status", "not running")
    )
    host, port = "127.0.0.1", None
    bound = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(
        f"{COMPOSE_PORTS.get(service, 0)}/tcp"
    )
    if bound:
        host = bound[0].get("HostIp") or "127.0.0.1"
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        port = int(bound[0]["HostPort"])
    image = container.attrs.get("Config", {}).get("Image", "?")
    return Endpoint(service, container.name, health, host, port, image)


def endpoints(env: Mapping[str, str]) -> dict[str, Endpoint]:
    """The project's services as the engine sees them now (empty when it is not up)."""
    selector = {"label": [f"{_LABEL_PROJECT}={project_name(env)}"]}
    with docker_client(env) as client:
        found = {
            e.service: e for e in map(_endpoint, client.containers.list(all=True, filters=selector))
        }
    return {service: found[service] for service in COMPOSE_PORTS if service in found}


def _not_ready(found: Mapping[str, Endpoint]) -> list[str]:
    problems = []
    for service in COMPOSE_PORTS:
        one = found.get(service)
        if one is None:
            problems.append(f"{service}: no container")
        elif one.health != "healthy":
            problems.append(f"{service}: {one.health} ({one.container})")
        elif one.port is None:
            problems.append(f"{service}: port {COMPOSE_PORTS[service]} is not published")
    return problems


def probe_compose(env: Mapping[str, str]) -> ProbeResult:
    """Is the compose project up and healthy on the engine at DOCKER_HOST?"""
    engine = probe_docker(env)
    if not engine.ok:
        return ProbeResult("compose", False, engine.detail, engine.fix)
    try:
        problems = _not_ready(endpoints(env))
    except Exception as exc:
        return ProbeResult("compose", False, f"listing containers failed: {exc}", engine.fix)
    project = project_name(env)
    if problems:
        return ProbeResult(
            "compose", False, f"project {project!r}: " + "; ".join(problems), _UP_FIX
        )
    return ProbeResult("compose", True, f"project {project!r} is healthy at {docker_host(env)}")


@dataclass(frozen=True)
class ComposeStarted:
    postgres_url: str
    postgres_admin_url: str
    redis_url: str
    amqp_url: str
    postgres_version: str
    redis_version: str
    images: dict[str, str]


def start_compose(
    env: Mapping[str, str],
    database: str,
    push: Callable[[str, Callable[[], None]], None],
    log: logging.Logger,
) -> ComposeStarted:
    """A database of this session's own on the project's Postgres; its Redis and RabbitMQ."""
    found = endpoints(env)
    problems = _not_ready(found)
    if problems:
        raise ServiceStartError(
            f"the compose project {project_name(env)!r} is not ready: " + "; ".join(problems),
            fix=_UP_FIX,
        )
    pg, rd, mq = found["postgres"], found["redis"], found["rabbitmq"]
    admin = f"postgresql+psycopg2://{POSTGRES_USER}:{POSTGRES_PASSWORD}@{pg.host}:{pg.port}/{POSTGRES_DB}"
    redis_url = f"redis://{rd.host}:{rd.port}/0"
    on_servers = {
        **{k: v for k, v in env.items() if k == "PYTEST_XDIST_WORKER"},
        DATABASE_VAR: admin,
        REDIS_VAR: redis_url,
    }
    pg_url, admin_url, redis_url, pg_version, redis_version = start_external(
        on_servers, database, push, log
    )
    with docker_client(env) as client:
        images = {e.service: image_version(client, e.image) for e in (pg, rd, mq)}
    return ComposeStarted(
        postgres_url=pg_url,
        postgres_admin_url=admin_url,
        redis_url=redis_url,
        amqp_url=f"amqp://{RABBITMQ_USER}:{RABBITMQ_PASSWORD}@{mq.host}:{mq.port}//",
        postgres_version=pg_version,
        redis_version=redis_version,
        images=images,
    )


# -- harness compose up / down ----------------------------------------------------------------


class ComposeError(ServicesError):
    """`harness compose up/down` could not do what it was asked."""


def compose_cli(env: Mapping[str, str]) -> list[str]:
    """The compose command here: the v2 plugin (`docker compose`) where it answers, else v1."""
    docker = shutil.which("docker", path=env.get("PATH"))
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, env=dict(env), check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose", path=env.get("PATH"))
    if legacy:
        return [legacy]
    raise ComposeError(
        "no compose command found",
        checked=["`docker compose version` (the v2 plugin)", "docker-compose on PATH (v1)"],
        fix="install one: `apt-get install docker-compose`, or Docker's compose plugin",
    )


_PORT_TAKEN = re.compile(r"(?i)(port is already allocated|address already in use)")


def _run(cli: Sequence[str], args: Sequence[str], env: Mapping[str, str], what: str) -> None:
    done = subprocess.run([*cli, *args], capture_output=True, text=True, env=dict(env), check=False)
    if done.returncode == 0:
        return
    output = (done.stderr + done.stdout).strip().splitlines()[-_LOG_TAIL:]
    asked = [f"{k}={v}" for k, v in env.items() if re.fullmatch(r"HARNESS_COMPOSE_\w+_PORT", k)]
    if any(_PORT_TAKEN.search(line) for line in output):
        raise ComposeError(
            f"compose {what} failed: a host port it asked for is taken",
            checked=asked or ["no HARNESS_COMPOSE_*_PORT is set"],
            log_tail=output,
            fix="unset HARNESS_COMPOSE_<SERVICE>_PORT to let the engine pick a free port, "
            "or free the port",
        )
    raise ComposeError(
        f"compose {what} failed (exit {done.returncode}): {' '.join([*cli, *args])}",
        log_tail=output,
        fix="read the output above; `docker info` says whether the engine is healthy",
    )


def _base_args(env: Mapping[str, str], file: Path) -> list[str]:
    return ["-f", str(file), "-p", project_name(env)]


def require_engine(env: Mapping[str, str]) -> None:
    """A ComposeError that says how to get an engine, unless one answers."""
    engine = probe_docker(env)
    if not engine.ok:
        raise ComposeError("no Docker engine answers", checked=[engine.detail], fix=engine.fix)


def compose_up(
    env: Mapping[str, str], *, file: Path, timeout: float = _HEALTHY_TIMEOUT_S
) -> dict[str, Endpoint]:
    """Start the project and wait until every service is healthy; returns the services."""
    require_engine(env)
    if not file.is_file():
        raise ComposeError(
            f"compose file {file} does not exist",
            fix=f"run from the project's root, or set {COMPOSE_FILE_VAR} to the file",
        )
    cli = compose_cli(env)
    _run(cli, [*_base_args(env, file), "up", "-d"], env, "up")

    def healthy() -> dict[str, Endpoint] | None:
        found = endpoints(env)
        problems = _not_ready(found)
        if not problems:
            return found
        failed = [e for e in found.values() if e.health in ("unhealthy", "exited", "dead")]
        if failed:  # it will not get better: say so now, not at the deadline
            raise _not_healthy(env, problems, failed[0], within=None)
        return None

    ready = poll_until(healthy, timeout=timeout, interval=_POLL_S)
    if ready is None:
        found = endpoints(env)
        stuck = next((e for e in found.values() if e.health != "healthy"), None)
        raise _not_healthy(env, _not_ready(found), stuck, within=timeout)
    return ready


def _not_healthy(
    env: Mapping[str, str], problems: Sequence[str], stuck: Endpoint | None, within: float | None
) -> ComposeError:
    log_tail: list[str] = []
    if stuck is not None:
        try:
            with docker_client(env) as client:
                log_tail = container_log_tail(client.containers.get(stuck.container))
        except Exception as exc:
            log_tail = [f"(no logs: {exc})"]
    return ComposeError(
        f"the compose project {project_name(env)!r} did not become healthy"
        + ("" if within is None else f" within {within:g} s")
        + ": "
        + "; ".join(problems),
        log_tail=log_tail,
        fix="read the container's log above (`docker logs <name>`); "
        "`harness compose down` removes the project",
    )


def compose_down(env: Mapping[str, str], *, file: Path) -> None:
    """Remove the project's containers, networks and volumes."""
    require_engine(env)
    cli = compose_cli(env)
    _run(cli, [*_base_args(env, file), "down", "-v", "--remove-orphans"], env, "down")
