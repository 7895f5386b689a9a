"""Server-level chores over an admin connection: create/drop databases, read versions."""

from __future__ import annotations

from typing import Any

import psycopg2
import redis
from psycopg2 import sql

from harness.services._base import libpq_dsn, show_value, with_database


def _admin_connection(admin_url: str) -> Any:
    conn = psycopg2.connect(libpq_dsn(admin_url), connect_timeout=10)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    return conn


def create_database(admin_url: str, name: str, *, template: str | None = None) -> str:
    """CREATE DATABASE `name` (optionally from `template`); returns its URL (admin_url's style)."""
    stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
    conn = _admin_connection(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute(stmt)
    finally:
        conn.close()
    return with_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Terminate the database's sessions, then DROP DATABASE IF EXISTS `name`."""
    conn = _admin_connection(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            drop = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
            if conn.server_version >= 130000:
                # FORCE closes sessions that connect between the terminate and the drop.
                drop = sql.SQL("{} WITH (FORCE)").format(drop)
            cur.execute(drop)
    finally:
        conn.close()


def postgres_server_version(url: str) -> str:
    """``SHOW server_version`` of the server behind `url`."""
    conn = psycopg2.connect(libpq_dsn(url), connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            version: str = show_value(cur.fetchone())
            return version
    finally:
        conn.close()


def redis_server_version(url: str) -> str:
    """``redis_version`` from INFO server of the server behind `url`."""
    client = redis.Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=5.0)
    try:
        return str(client.info("server").get("redis_version", "unknown"))
    finally:
        client.close()
