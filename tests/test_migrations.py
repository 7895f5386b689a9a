"""The migrations on a real Postgres: 0002 fixes the rows 0001 let in, then refuses them."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import IntegrityError

from app.migrations import alembic_config, upgrade
from harness.services import Services, create_database, drop_database

pytestmark = pytest.mark.integration


@pytest.fixture
def at_0001(services: Services) -> Iterator[Engine]:
    """A fresh database migrated to 0001 only."""
    name = f"migrations_{secrets.token_hex(4)}"
    url = create_database(services.postgres_admin_url, name)
    upgrade(url, "0001")
    engine = create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
        drop_database(services.postgres_admin_url, name)


def _insert(engine: Engine, sql: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql))


def test_0002_fixes_old_rows_and_then_refuses_incomplete_terminal_rows(at_0001: Engine) -> None:
    columns = "project_id, marketplace_code, job_code, status"
    # What 0001 let in: JSON null stats; a failed run with no duration; a success with neither.
    _insert(
        at_0001,
        f"INSERT INTO ingest_runs ({columns}, created_at, started_at, finished_at, stats_json) "
        "VALUES (1, 'a', 'stocks', 'failed', now() - interval '2 s', now() - interval '1 s', "
        "now(), 'null'::jsonb)",
    )
    _insert(
        at_0001,
        f"INSERT INTO ingest_runs ({columns}, created_at, heartbeat_at) "
        "VALUES (1, 'b', 'stocks', 'success', now() - interval '3 s', now())",
    )
    _insert(at_0001, f"INSERT INTO ingest_runs ({columns}) VALUES (1, 'c', 'stocks', 'queued')")

    upgrade(str(at_0001.url.render_as_string(hide_password=False)))

    with at_0001.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT marketplace_code, stats_json IS NULL AS sql_null, finished_at IS NOT NULL "
                "AS ended, duration_ms FROM ingest_runs ORDER BY id"
            )
        ).all()
    assert [(r.marketplace_code, r.sql_null, r.ended) for r in rows] == [
        ("a", True, True),
        ("b", True, True),
        ("c", True, False),
    ]
    assert rows[0].duration_ms is not None and 900 <= rows[0].duration_ms <= 1500, rows[0]
    assert rows[1].duration_ms is not None and rows[1].duration_ms >= 2900, rows[1]
    assert rows[2].duration_ms is None  # queued: nothing to say yet

    with pytest.raises(IntegrityError, match="terminal_rows_complete"):
        _insert(at_0001, f"INSERT INTO ingest_runs ({columns}) VALUES (1, 'd', 'stocks', 'failed')")


def test_0002_downgrades(at_0001: Engine) -> None:
    from alembic import command

    url = at_0001.url.render_as_string(hide_password=False)
    upgrade(url)
    command.downgrade(alembic_config(url), "0001")
    _insert(
        at_0001,
        "INSERT INTO ingest_runs (project_id, marketplace_code, job_code, status) "
        "VALUES (1, 'e', 'stocks', 'failed')",
    )
