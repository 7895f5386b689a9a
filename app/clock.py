"""Wall-clock time for rows: timezone-aware UTC, one function so tests can freeze it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["duration_ms", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def duration_ms(started_at: datetime, finished_at: datetime) -> int:
    """Whole milliseconds between two instants, rounded down, never negative."""
    return max(0, (finished_at - started_at) // timedelta(milliseconds=1))
