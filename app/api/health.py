"""Whether the database and the broker answer, each within a short timeout."""

from __future__ import annotations

from typing import Final

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

__all__ = [
    "HEALTH_TIMEOUT_S",
    "check_broker",
    "check_database",
    "describe_exception",
    "health_engine",
]

# Postgres' connect_timeout has a floor of 2 s, so this is the shortest that means anything.
HEALTH_TIMEOUT_S: Final = 2.0


def describe_exception(exc: BaseException, max_len: int = 300) -> str:
    """``Type: message``, first line only, bounded: safe to show in a response.

    SQLAlchemy wraps the driver's error and appends a link; the driver's own message is the
    useful part. Neither the drivers nor kombu put passwords in connection errors.
    """
    orig = getattr(exc, "orig", None) if isinstance(exc, SQLAlchemyError) else None
    inner: BaseException = orig if isinstance(orig, BaseException) else exc
    lines = str(inner).strip().splitlines()
    message = lines[0].strip() if lines else ""
    text_ = f"{type(inner).__name__}: {message}" if message else type(inner).__name__
    return text_ if len(text_) <= max_len else text_[: max_len - 3] + "..."


def health_engine(database_url: str) -> Engine:
    """An engine only for the health check: no pool (nothing to go stale) and short timeouts."""
    timeout_ms = int(HEALTH_TIMEOUT_S * 1000)
    return create_engine(
        database_url,
        poolclass=NullPool,
        connect_args={
            "connect_timeout": int(HEALTH_TIMEOUT_S),
            "options": f"-c statement_timeout={timeout_ms}",
        },
    )


def check_database(engine: Engine) -> str:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure is the answer, not a crash of the health check
        return f"error: {describe_exception(exc)}"
    return "ok"


def check_broker(broker_url: str) -> str:
    # The Celery app's connection settings (SSL, transport options) apply, with the URL and
    # timeouts given here; a Redis broker is pinged when its first channel opens.
    from app.celery_app import celery_app

    try:
        with celery_app.connection_for_write(
            broker_url,
            connect_timeout=HEALTH_TIMEOUT_S,
            transport_options={
                "max_retries": 0,
                "socket_connect_timeout": HEALTH_TIMEOUT_S,
                "socket_timeout": HEALTH_TIMEOUT_S,
            },
        ) as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=HEALTH_TIMEOUT_S
            )
    except Exception as exc:
        return f"error: {describe_exception(exc)}"
    return "ok"
