"""The report service's one table, created by plain SQL (no Alembic here)."""

from __future__ import annotations

from sqlalchemy import create_engine, text

__all__ = ["migrate"]

_DDL = """
CREATE TABLE IF NOT EXISTS report_jobs (
    id          BIGSERIAL PRIMARY KEY,
    tenant      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'building', 'done', 'error')),
    queued_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    begun_at    TIMESTAMPTZ,
    ended_at    TIMESTAMPTZ,
    elapsed_ms  INTEGER,
    result      JSONB,
    failure     TEXT
)
"""


def migrate(database_url: str) -> None:
    """Create the table if it is not there."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(_DDL))
    finally:
        engine.dispose()
