"""The API's reads and writes of ``ingest_runs`` (sync SQLAlchemy Core, one transaction each).

Starting a run relies on the partial unique index ``uq_ingest_runs_one_active``: the insert
either creates the one active run for its key or fails with ``ActiveRunExists``; there is no
check-then-insert window in which two requests could both start a run.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import Engine, Row, func, insert, literal, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from app.clock import duration_ms, utcnow
from app.models import ACTIVE_RUN_INDEX, ACTIVE_STATUSES, IngestRun

__all__ = [
    "ActiveRunExists",
    "create_run",
    "get_run",
    "list_runs",
    "mark_enqueue_failed",
    "record_task_id",
]

# Exactly what the API shows: the runbook's keys plus where the run belongs.
_COLUMNS: Final = (
    IngestRun.id,
    IngestRun.status,
    IngestRun.started_at,
    IngestRun.finished_at,
    IngestRun.duration_ms,
    IngestRun.stats_json,
    IngestRun.error_message,
    IngestRun.project_id,
    IngestRun.marketplace_code,
    IngestRun.job_code,
    IngestRun.created_at,
)


class ActiveRunExists(Exception):
    """The project, marketplace and job already have a queued or running run."""

    def __init__(self, active_run_id: int | None) -> None:
        super().__init__(active_run_id)
        # None when that run finished between our failed insert and the lookup.
        self.active_run_id = active_run_id


def _as_dict(row: Row[Any]) -> dict[str, Any]:
    return dict(row._mapping)


def _constraint_name(exc: IntegrityError) -> str | None:
    diag = getattr(exc.orig, "diag", None)  # psycopg2 reports which constraint was violated
    name = getattr(diag, "constraint_name", None)
    return name if isinstance(name, str) else None


class StartExpired(Exception):
    """The insert reached the database after the start's deadline; nothing was inserted."""


def create_run(
    engine: Engine,
    *,
    project_id: int,
    marketplace_code: str,
    job_code: str,
    not_after: datetime | None = None,
) -> dict[str, Any]:
    """Insert a ``queued`` run, or raise ``ActiveRunExists``.

    ``not_after``: the database inserts nothing once its own clock has passed it (the request
    that asked has had its answer by then), and ``StartExpired`` is raised.
    """
    values = {
        "project_id": project_id,
        "marketplace_code": marketplace_code,
        "job_code": job_code,
        "status": "queued",
    }
    if not_after is None:
        stmt: Any = insert(IngestRun).values(**values)
    else:
        chosen = select(*(literal(v).label(k) for k, v in values.items())).where(
            func.clock_timestamp() < not_after
        )
        stmt = insert(IngestRun).from_select(list(values), chosen)
    try:
        with engine.begin() as conn:
            row = conn.execute(stmt.returning(*_COLUMNS)).one_or_none()
            if row is None:
                raise StartExpired(f"the insert arrived after {not_after}")
    except IntegrityError as exc:
        if _constraint_name(exc) != ACTIVE_RUN_INDEX:
            raise
        # Only to say which run is in the way; the index, not this lookup, decided.
        with engine.connect() as conn:
            active = conn.execute(
                select(IngestRun.id).where(
                    IngestRun.project_id == project_id,
                    IngestRun.marketplace_code == marketplace_code,
                    IngestRun.job_code == job_code,
                    IngestRun.status.in_(ACTIVE_STATUSES),
                )
            ).scalar_one_or_none()
        raise ActiveRunExists(active) from exc
    return _as_dict(row)


def record_task_id(engine: Engine, run_id: int, task_id: str | None) -> dict[str, Any]:
    """Store the enqueue id (unless the worker already did) and return the run as it is now."""
    with engine.begin() as conn:
        if task_id is None:
            row = conn.execute(select(*_COLUMNS).where(IngestRun.id == run_id)).one()
        else:
            row = conn.execute(
                update(IngestRun)
                .where(IngestRun.id == run_id)
                # The worker writes the same id when it claims the run; keep whichever came first.
                .values(celery_task_id=func.coalesce(IngestRun.celery_task_id, task_id))
                .returning(*_COLUMNS)
            ).one()
    return _as_dict(row)


def mark_enqueue_failed(engine: Engine, run_id: int, error_message: str) -> bool:
    """Fail a run whose message never reached the broker; False if a worker already claimed it."""
    with engine.begin() as conn:
        created = conn.execute(
            select(IngestRun.created_at)
            .where(IngestRun.id == run_id, IngestRun.status == "queued")
            .with_for_update()
        ).scalar_one_or_none()
        if created is None:
            return False
        now = utcnow()
        conn.execute(
            update(IngestRun)
            .where(IngestRun.id == run_id)
            .values(
                status="failed",
                finished_at=now,
                # From its creation: it never started (as unlock_stale_runs counts such a run).
                duration_ms=duration_ms(created, now),
                heartbeat_at=now,
                error_message=error_message,
            )
        )
    return True


def get_run(engine: Engine, *, project_id: int, run_id: int) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(*_COLUMNS).where(IngestRun.id == run_id, IngestRun.project_id == project_id)
        ).one_or_none()
    return None if row is None else _as_dict(row)


def list_runs(
    engine: Engine,
    *,
    project_id: int,
    limit: int,
    status: str | None = None,
    before_id: int | None = None,
) -> list[dict[str, Any]]:
    """Newest first (``created_at``, then ``id``); ``before_id`` continues after that run."""
    stmt = select(*_COLUMNS).where(IngestRun.project_id == project_id)
    if status is not None:
        stmt = stmt.where(IngestRun.status == status)
    if before_id is not None:
        # Keyset paging on (created_at, id): stable while runs are added, and a cursor from
        # another project (or a missing run) matches nothing rather than another project's order.
        cursor = (
            select(IngestRun.created_at.label("c_created"), IngestRun.id.label("c_id"))
            .where(IngestRun.id == before_id, IngestRun.project_id == project_id)
            .subquery()
        )
        stmt = stmt.join(
            cursor,
            tuple_(IngestRun.created_at, IngestRun.id) < tuple_(cursor.c.c_created, cursor.c.c_id),
        )
    stmt = stmt.order_by(IngestRun.created_at.desc(), IngestRun.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [_as_dict(row) for row in conn.execute(stmt)]
