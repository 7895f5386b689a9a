"""Postgres and Redis in containers (testcontainers), for machines where a Docker engine answers.

The probe talks to the engine's socket itself: docker-py's client leaks its socket (a
ResourceWarning, an error under ``filterwarnings = error``) when no engine is there, and it is
the common case on CI runners and dev boxes without Docker that must stay fast and quiet.
Containers outlive a SIGKILLed test process only until testcontainers' Ryuk reaper notices.
"""

from __future__ import annotations

import gc
import logging
import socket
import urllib.parse
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from harness.services._base import ProbeResult, ServiceStartError, mask_dsn, with_database

POSTGRES_IMAGE = "postgres:16-alpine"
REDIS_IMAGE = "redis:7-alpine"
_DEFAULT_SOCKET = "/var/run/docker.sock"
_FIX = (
    "start the Docker engine (e.g. `sudo systemctl start docker`) or point DOCKER_HOST at one; "
    "or use the local binaries / an external server instead"
)


def _http_ping(sock: socket.socket) -> str:
    """'' if the engine answered GET /_ping with 200, else what it said."""
    sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
    reply = b""
    while len(reply) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    status = reply.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    return "" if " 200 " in f"{status} " else f"answered {status!r}"


def probe_docker(env: Mapping[str, str], *, timeout: float = 0.5) -> ProbeResult:
    """Does a Docker engine answer GET /_ping at DOCKER_HOST (default /var/run/docker.sock)?"""
    host = env.get("DOCKER_HOST", "")
    target = host or f"unix://{_DEFAULT_SOCKET}"
    where = f"DOCKER_HOST={host}" if host else f"DOCKER_HOST is not set; default {target}"
    parsed = urllib.parse.urlsplit(target)
    try:
        if parsed.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = parsed.path
        elif parsed.scheme in ("tcp", "http", "https"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (parsed.hostname or "127.0.0.1", parsed.port or 2375)
        else:
            # ssh://, npipe://: no cheap check; let testcontainers try (auto falls back if it fails)
            return ProbeResult("docker", True, f"{where} (scheme {parsed.scheme!r} not probed)")
        with sock:
            sock.settimeout(timeout)
            sock.connect(address)
            tls = parsed.scheme == "https" or bool(env.get("DOCKER_TLS_VERIFY"))
            problem = "" if tls else _http_ping(sock)  # TLS: reaching the port has to do
    except FileNotFoundError:
        return ProbeResult("docker", False, f"{where}, and that socket does not exist", _FIX)
    except OSError as exc:
        return ProbeResult("docker", False, f"{where}; connecting failed: {exc}", _FIX)
    if problem:
        return ProbeResult("docker", False, f"{where}; the engine {problem} to /_ping", _FIX)
    return ProbeResult("docker", True, f"engine answered at {target}")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def start_docker(
    database: str,
    push: Callable[[str, Callable[[], None]], None],
    log: logging.Logger,
) -> tuple[str, str, str]:
    """Start both containers; returns (postgres_url, postgres_admin_url, redis_url).

    Every container is registered with `push` as soon as it exists, so the caller's stop()
    removes it whatever fails next.
    """
    try:
        from testcontainers.community.postgres import PostgresContainer
        from testcontainers.community.redis import RedisContainer
    except ImportError as exc:
        raise ServiceStartError(
            f"the docker backend needs testcontainers: {exc}",
            fix="pip install 'testcontainers[postgres,redis]>=4.4' (the project's test extra)",
        ) from exc

    failure = ""
    with warnings.catch_warnings():
        # When the engine vanishes between probe and start, docker-py leaks the socket of
        # its failed version check; that is its bug, reported here as our start error.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            pg = PostgresContainer(
                POSTGRES_IMAGE,
                username="postgres",
                password="postgres",
                dbname=database,
                driver="psycopg2",
            )
            push("postgres container", pg.stop)
            log.info("starting %s (the first run pulls the image)", POSTGRES_IMAGE)
            pg.start()
            rc = RedisContainer(REDIS_IMAGE)
            push("redis container", rc.stop)
            log.info("starting %s", REDIS_IMAGE)
            rc.start()
            pg_url: str = pg.get_connection_url()
            redis_host = rc.get_container_host_ip()
            redis_port = rc.get_exposed_port(6379)
        except Exception as exc:
            failure = _describe(exc)
        if failure:
            gc.collect()  # let the leaked socket go while its warning is ignored
    if failure:
        raise ServiceStartError(
            f"the docker backend failed to start its containers: {failure}",
            checked=[f"images: {POSTGRES_IMAGE}, {REDIS_IMAGE}"],
            fix="check `docker info` and that the images can be pulled; " + _FIX,
        )
    admin_url = with_database(pg_url, "postgres")
    redis_url = f"redis://{redis_host}:{redis_port}/0"
    log.info("docker services: %s, %s", mask_dsn(pg_url), redis_url)
    return pg_url, admin_url, redis_url
