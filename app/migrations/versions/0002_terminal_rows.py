"""terminal rows: SQL NULL stats, finished_at and duration_ms always set

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

A failed run's stats_json was stored as the JSON value ``null``, not SQL NULL, so
``WHERE stats_json IS NULL`` (the runbook's kind of query) missed it; and a run that failed
to enqueue had no duration_ms. Existing rows are fixed, and a check constraint makes the
database refuse a terminal row without finished_at or duration_ms from now on.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TERMINAL_COMPLETE = "ck_ingest_runs_terminal_rows_complete"


def upgrade() -> None:
    op.execute("UPDATE ingest_runs SET stats_json = NULL WHERE stats_json = 'null'::jsonb")
    op.execute(
        "UPDATE ingest_runs SET finished_at = COALESCE(finished_at, heartbeat_at, now()) "
        "WHERE status IN ('success', 'failed') AND finished_at IS NULL"
    )
    op.execute(
        "UPDATE ingest_runs SET duration_ms = GREATEST(0, FLOOR(EXTRACT(EPOCH FROM "
        "(finished_at - COALESCE(started_at, created_at))) * 1000))::bigint "
        "WHERE status IN ('success', 'failed') AND duration_ms IS NULL"
    )
    op.create_check_constraint(
        op.f(TERMINAL_COMPLETE),
        "ingest_runs",
        "status NOT IN ('success', 'failed') "
        "OR (finished_at IS NOT NULL AND duration_ms IS NOT NULL)",
    )


def downgrade() -> None:
    op.drop_constraint(op.f(TERMINAL_COMPLETE), "ingest_runs", type_="check")
