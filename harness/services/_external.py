"""Servers someone else runs, given by URL (HARNESS_DATABASE_URL, HARNESS_REDIS_URL).

We never touch existing data there: each session creates its own uniquely named database and
drops it at stop, so parallel sessions and xdist workers never share state. Redis is used at
the db number the URL names, as given.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping

import psycopg2
import redis

from harness.services._admin import (
    create_database,
    drop_database,
    postgres_server_version,
    redis_server_version,
)
from harness.services._base import (
    ProbeResult,
    ServiceStartError,
    mask_dsn,
    pg_database,
    sqlalchemy_pg_url,
    with_database,
)

DATABASE_VAR = "HARNESS_DATABASE_URL"
REDIS_VAR = "HARNESS_REDIS_URL"
AMQP_VAR = "HARNESS_AMQP_URL"
_FIX = (
    f"set {DATABASE_VAR}=postgresql+psycopg2://USER:PASSWORD@HOST:5432/postgres (a role allowed "
    f"to CREATE DATABASE) and {REDIS_VAR}=redis://HOST:6379/15, then use --services=external "
    "(auto uses them too when neither docker nor local works)"
)


def probe_external(env: Mapping[str, str]) -> ProbeResult:
    """Are both external URLs given? (Reachability is checked at start, with a clear error.)"""
    missing = [var for var in (DATABASE_VAR, REDIS_VAR) if not env.get(var)]
    if missing:
        return ProbeResult("external", False, " and ".join(missing) + " not set", _FIX)
    return ProbeResult(
        "external",
        True,
        f"{DATABASE_VAR}={mask_dsn(env[DATABASE_VAR])}, {REDIS_VAR}={mask_dsn(env[REDIS_VAR])}",
    )


def session_database_name(database: str, env: Mapping[str, str]) -> str:
    """``<database>_<xdist worker>_<pid>_<random>``: unique per session, readable, <= 63 bytes."""
    worker = re.sub(r"\W", "", env.get("PYTEST_XDIST_WORKER", "")) or "main"
    suffix = f"_{worker}_{os.getpid()}_{secrets.token_hex(3)}".lower()
    return database[: 63 - len(suffix)] + suffix


def start_external(
    env: Mapping[str, str],
    database: str,
    push: Callable[[str, Callable[[], None]], None],
    log: logging.Logger,
) -> tuple[str, str, str, str, str]:
    """Returns (postgres_url, admin_url, redis_url, postgres_version, redis_version)."""
    given = env.get(DATABASE_VAR, "")
    redis_url = env.get(REDIS_VAR, "")
    if not given or not redis_url:
        raise ServiceStartError(f"{DATABASE_VAR} and {REDIS_VAR} must both be set", fix=_FIX)
    try:
        url = sqlalchemy_pg_url(given)
    except ValueError as exc:
        raise ServiceStartError(f"{DATABASE_VAR} is not a PostgreSQL URL: {exc}", fix=_FIX) from exc
    # Create/drop run on the database the URL names (the role can certainly connect there);
    # `postgres` when it names none.
    admin_url = url if pg_database(url) else with_database(url, "postgres")
    name = session_database_name(database, env)
    try:
        pg_version = postgres_server_version(admin_url)
        postgres_url = create_database(admin_url, name)
    except psycopg2.Error as exc:
        raise ServiceStartError(
            f"cannot create database {name!r} on the server at {mask_dsn(admin_url)}: "
            f"{str(exc).strip()}",
            checked=[f"{DATABASE_VAR}={mask_dsn(given)}"],
            fix="check that the server is up, the URL is right, and the role may CREATE DATABASE",
        ) from exc
    push(f"database {name}", lambda: _drop(admin_url, name, log))
    log.info("external postgres %s: created database %s", pg_version, name)
    try:
        redis_version = redis_server_version(redis_url)
    except (redis.RedisError, ValueError) as exc:
        raise ServiceStartError(
            f"the Redis server at {mask_dsn(redis_url)} did not answer: {exc}",
            checked=[f"{REDIS_VAR}={mask_dsn(redis_url)}"],
            fix=f"check that the server is up and {REDIS_VAR} is right (redis://HOST:PORT/DB)",
        ) from exc
    return postgres_url, admin_url, redis_url, pg_version, redis_version


def _drop(admin_url: str, name: str, log: logging.Logger) -> None:
    drop_database(admin_url, name)
    log.info("dropped database %s", name)
