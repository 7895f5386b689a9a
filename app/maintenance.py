"""Maintenance of ``ingest_runs``: mark runs that no worker is looking after any more as failed.

``unlock_stale_runs`` is the logic behind ``scripts/unlock_stale_runs.py``. It is safe to run
while workers run: a run whose heartbeat is fresh, or whose row a worker holds locked at that
moment, is never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    Engine,
    and_,
    create_engine,
    func,
    or_,
    select,
    update,
)

from app.clock import duration_ms, utcnow
from app.db import engine_options
from app.models import IngestRun

__all__ = [
    "DEFAULT_OLDER_THAN",
    "DURATION_FORMS",
    "UnlockedRun",
    "format_duration",
    "parse_duration",
    "unlock_stale_runs",
]

DEFAULT_OLDER_THAN: Final = timedelta(minutes=15)

# The prefix lets anyone reading error_message (API, UI, SQL) tell an unlock from a job error.
MESSAGE_PREFIX: Final = "unlocked as stale by unlock_stale_runs"

DURATION_FORMS: Final = (
    "a whole number with a unit s, m, h or d (90s, 15m, 2h, 1d) or plain minutes (15)"
)

# A sign is read so that "-5m" is refused for what it is (not positive), not as gibberish.
_DURATION_RE: Final = re.compile(r"([+-]?\d+)([smhd]?)")
# Longer cannot be subtracted from now (datetime's range) and means nothing for a heartbeat.
MAX_DURATION: Final = timedelta(days=36500)
_UNITS: Final = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "": timedelta(minutes=1),
}

LastSeen = Literal["heartbeat", "started", "created"]


@dataclass(frozen=True, slots=True)
class UnlockedRun:
    """One run marked ``failed`` (or, in a dry run, that would have been), with what was written.

    ``last_seen`` says which column ``last_seen_at`` comes from: the last heartbeat, the start
    of a run that never sent one, or the creation of a run that never started.
    """

    id: int
    project_id: int
    marketplace_code: str
    job_code: str
    previous_status: str
    last_seen: LastSeen
    last_seen_at: datetime
    finished_at: datetime
    duration_ms: int
    error_message: str

    def describe_last_seen(self) -> str:
        """The last sign of life in words, e.g. ``last heartbeat 2026-01-27T10:00:00Z``."""
        return _describe_last_seen(self.last_seen, self.last_seen_at)


def parse_duration(value: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``1d`` or plain minutes (``15``) as a positive timedelta."""
    match = _DURATION_RE.fullmatch(value.strip().lower())
    if match is None:
        raise ValueError(f"invalid duration {value!r}: use {DURATION_FORMS}")
    number = int(match.group(1))
    if number <= 0:
        # Zero would make every active run stale, including the ones workers are running now.
        raise ValueError(f"invalid duration {value!r}: it must be greater than zero")
    unit = _UNITS[match.group(2)]
    if number > MAX_DURATION // unit:
        raise ValueError(f"invalid duration {value!r}: at most {MAX_DURATION.days}d (100 years)")
    return number * unit


def format_duration(value: timedelta) -> str:
    """The compact form ``parse_duration`` reads: ``15m``, ``90s`` -> ``1m30s``, ``1d2h``."""
    total_us = value // timedelta(microseconds=1)
    sign = "-" if total_us < 0 else ""
    seconds, micros = divmod(abs(total_us), 1_000_000)
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if micros:
        parts.append(f"{seconds}.{micros:06d}".rstrip("0") + "s")
    elif seconds or not parts:
        parts.append(f"{seconds}s")
    return sign + "".join(parts)


def unlock_stale_runs(
    engine_or_url: Engine | URL | str,
    *,
    older_than: timedelta = DEFAULT_OLDER_THAN,
    project_id: int | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> list[UnlockedRun]:
    """Mark stale active runs ``failed`` and return them, ordered by id.

    Stale means: ``running`` with its last heartbeat (its ``started_at`` when it has none, its
    ``created_at`` when it has neither) before ``now - older_than``; or ``queued`` with
    ``created_at`` before that bound. Each one gets ``finished_at = now``, ``duration_ms`` from
    ``started_at`` to ``now`` (from ``created_at`` for a run that never started: the time it
    held its slot) and an ``error_message`` saying it was unlocked and since when it was silent.
    ``heartbeat_at``, ``started_at`` and ``stats_json`` are kept as they were, as evidence.

    ``dry_run`` returns what would be written and changes nothing. A second call finds nothing:
    the runs are no longer active. ``now`` defaults to ``app.clock.utcnow()``.
    """
    if older_than <= timedelta(0):
        raise ValueError(f"older_than must be positive, got {older_than!r}")
    now = utcnow() if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (app.clock.utcnow() is)")
    cutoff = now - older_than

    owned = not isinstance(engine_or_url, Engine)
    engine = (
        engine_or_url
        if isinstance(engine_or_url, Engine)
        else create_engine(engine_or_url, **engine_options())
    )
    try:
        if dry_run:
            # A plain read: no row locks, so a dry run never makes a heartbeat wait, and it
            # works with a read-only role.
            with engine.connect() as conn:
                found = _stale_rows(conn, cutoff, project_id, lock=False)
            return [_unlocked(row, now, older_than) for row in found]
        return _unlock(engine, cutoff, project_id, now, older_than)
    finally:
        if owned:
            engine.dispose()


@dataclass(frozen=True, slots=True)
class _Candidate:
    id: int
    project_id: int
    marketplace_code: str
    job_code: str
    status: str
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None


def _unlock(
    engine: Engine, cutoff: datetime, project_id: int | None, now: datetime, older_than: timedelta
) -> list[UnlockedRun]:
    done: list[UnlockedRun] = []
    with engine.begin() as conn:
        # FOR UPDATE SKIP LOCKED: a row a worker is writing right now (a heartbeat, its finish)
        # is alive by definition, so skip it rather than wait; the rows we lock cannot get a
        # heartbeat until we commit, and a worker's own finish then sees they are no longer
        # running and leaves them alone (app.tasks.ingest._finish).
        for row in _stale_rows(conn, cutoff, project_id, lock=True):
            run = _unlocked(row, now, older_than)
            # The staleness condition again, in the UPDATE itself: the row is locked, so this
            # cannot fail today, but the update must stay correct if the locking ever changes.
            written = conn.execute(
                update(IngestRun)
                .where(IngestRun.id == row.id, IngestRun.status == row.status, _is_stale(cutoff))
                .values(
                    status="failed",
                    finished_at=run.finished_at,
                    duration_ms=run.duration_ms,
                    error_message=run.error_message,
                )
                .returning(IngestRun.id)
            ).first()
            if written is not None:
                done.append(run)
    return done


def _last_seen_at() -> ColumnElement[datetime]:
    # created_at is the last resort: a running row without started_at should not exist (the
    # task sets both when it claims a run), but if one does, it must not stay stuck forever.
    return func.coalesce(IngestRun.heartbeat_at, IngestRun.started_at, IngestRun.created_at)


def _is_stale(cutoff: datetime) -> ColumnElement[bool]:
    return or_(
        and_(IngestRun.status == "running", _last_seen_at() < cutoff),
        and_(IngestRun.status == "queued", IngestRun.created_at < cutoff),
    )


def _stale_rows(
    conn: Connection, cutoff: datetime, project_id: int | None, *, lock: bool
) -> list[_Candidate]:
    stmt = (
        select(
            IngestRun.id,
            IngestRun.project_id,
            IngestRun.marketplace_code,
            IngestRun.job_code,
            IngestRun.status,
            IngestRun.created_at,
            IngestRun.started_at,
            IngestRun.heartbeat_at,
        )
        .where(_is_stale(cutoff))
        # Ordered by id: stable output, and every unlocker takes its row locks in one order.
        .order_by(IngestRun.id)
    )
    if project_id is not None:
        stmt = stmt.where(IngestRun.project_id == project_id)
    if lock:
        stmt = stmt.with_for_update(skip_locked=True)
    return [_Candidate(*row) for row in conn.execute(stmt)]


def _unlocked(row: _Candidate, now: datetime, older_than: timedelta) -> UnlockedRun:
    last_seen: LastSeen
    # The same column _is_stale judged the row by, so the message names what was too old.
    if row.status == "queued":
        last_seen, last_seen_at = "created", row.created_at
    elif row.heartbeat_at is not None:
        last_seen, last_seen_at = "heartbeat", row.heartbeat_at
    elif row.started_at is not None:
        last_seen, last_seen_at = "started", row.started_at
    else:
        last_seen, last_seen_at = "created", row.created_at
    message = (
        f"{MESSAGE_PREFIX}: status was {row.status}, "
        f"{_describe_last_seen(last_seen, last_seen_at)} (older than {format_duration(older_than)})"
    )
    return UnlockedRun(
        id=row.id,
        project_id=row.project_id,
        marketplace_code=row.marketplace_code,
        job_code=row.job_code,
        previous_status=row.status,
        last_seen=last_seen,
        last_seen_at=last_seen_at,
        finished_at=now,
        # A run that never started held its slot since it was queued: that is its duration.
        duration_ms=duration_ms(row.started_at or row.created_at, now),
        error_message=message,
    )


def _describe_last_seen(last_seen: LastSeen, at: datetime) -> str:
    when = _iso(at)
    if last_seen == "heartbeat":
        return f"last heartbeat {when}"
    if last_seen == "started":
        return f"started {when}, no heartbeat"
    return f"created {when}, never started"


def _iso(value: datetime) -> str:
    # Whole seconds: the message is for people; the exact instants stay in their columns.
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
