"""Runs as the harness sees them: create a row, wait until it is terminal, read it back.

Reads use the harness's own engine (never the worker's), so an assertion only ever sees what
the worker committed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, create_engine, text

from app.models import TERMINAL_STATUSES
from harness.core.errors import CheckFailed
from harness.core.poll import poll_until

__all__ = [
    "RunNotTerminalError",
    "RunRow",
    "RunStore",
]

_COLUMNS = (
    "id, project_id, marketplace_code, job_code, status, created_at, started_at, finished_at, "
    "duration_ms, stats_json, error_message, heartbeat_at, celery_task_id"
)


@dataclass(frozen=True)
class RunRow:
    """One ``ingest_runs`` row, exactly as stored."""

    id: int
    project_id: int
    marketplace_code: str
    job_code: str
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    stats_json: dict[str, Any] | None
    error_message: str | None
    heartbeat_at: datetime | None
    celery_task_id: str | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunNotTerminalError(CheckFailed):
    """A run did not reach ``success`` or ``failed`` in time; carries its last row."""

    def __init__(self, message: str, row: RunRow | None) -> None:
        super().__init__(message)
        self.row = row


class RunStore:
    """The harness's window on ``ingest_runs``, on a connection of its own."""

    def __init__(self, database_url: str | Engine) -> None:
        if isinstance(database_url, Engine):
            self._engine = database_url
            self._owned = False
        else:
            self._engine = create_engine(database_url, pool_size=2, max_overflow=4)
            self._owned = True

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        if self._owned:
            self._engine.dispose()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def create(
        self,
        *,
        project_id: int = 1,
        marketplace_code: str = "demo",
        job_code: str = "frontend_prices",
    ) -> int:
        """Insert a ``queued`` run, as the API does, and return its id."""
        with self._engine.begin() as conn:
            run_id = conn.execute(
                text(
                    "INSERT INTO ingest_runs (project_id, marketplace_code, job_code, status) "
                    "VALUES (:p, :m, :j, 'queued') RETURNING id"
                ),
                {"p": project_id, "m": marketplace_code, "j": job_code},
            ).scalar_one()
        return int(run_id)

    def get(self, run_id: int) -> RunRow | None:
        with self._engine.connect() as conn:
            row = (
                conn.execute(
                    text(f"SELECT {_COLUMNS} FROM ingest_runs WHERE id = :id"), {"id": run_id}
                )
                .mappings()
                .first()
            )
        return None if row is None else RunRow(**row)

    def read(self, run_id: int) -> RunRow:
        row = self.get(run_id)
        if row is None:
            raise LookupError(f"ingest_runs has no row with id {run_id}")
        return row

    def wait_terminal(self, run_id: int, *, timeout: float = 30.0, poll: float = 0.01) -> RunRow:
        """Poll until the run is ``success`` or ``failed``; a deadline, never a fixed sleep."""
        last: RunRow | None = None

        def terminal() -> RunRow | None:
            nonlocal last
            last = self.get(run_id)
            return last if last is not None and last.terminal else None

        row = poll_until(terminal, timeout=timeout, interval=poll)
        if row is None:
            state = "no such row" if last is None else f"status {last.status!r}"
            raise RunNotTerminalError(
                f"run {run_id} is not terminal after {timeout:.1f}s ({state}); "
                "is the worker consuming its queue? see the worker log below",
                last,
            )
        return row

    def count_rows(self, table: str, **where: object) -> int:
        if table not in {"frontend_prices", "stocks", "ingest_runs"}:
            raise ValueError(f"unknown table {table!r}")
        clause = " AND ".join(f"{k} = :{k}" for k in where) or "TRUE"
        with self._engine.connect() as conn:
            return int(
                conn.execute(
                    text(f"SELECT count(*) FROM {table} WHERE {clause}"), where
                ).scalar_one()
            )
