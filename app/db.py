"""Database access: a sync engine per process (psycopg2) for the task, the API and the scripts.

The async jobs make their own async engine and dispose of it before their loop closes (see
``app.ingest.base``): an asyncpg pool is bound to the loop that created it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings

__all__ = [
    "CONNECT_TIMEOUT_S",
    "LOCK_TIMEOUT_MS",
    "STATEMENT_TIMEOUT_MS",
    "dispose_engine",
    "engine_options",
    "get_engine",
    "session_scope",
]

# Bounds on every talk with Postgres (the API, the worker, the unlock script), so that a server
# that hangs (stopped, overloaded, a lock held) makes a clear error in seconds, never a wait
# without end. statement_timeout and lock_timeout are the server's own; a server that is not
# running at all can enforce neither, so the API also bounds each request (app.api.routes).
CONNECT_TIMEOUT_S: Final = 3
STATEMENT_TIMEOUT_MS: Final = 30_000
LOCK_TIMEOUT_MS: Final = 5_000
POOL_TIMEOUT_S: Final = 5.0


def engine_options() -> dict[str, Any]:
    """``create_engine`` keyword arguments with the bounds above (psycopg2)."""
    return {
        "pool_timeout": POOL_TIMEOUT_S,
        "connect_args": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} "
            f"-c lock_timeout={LOCK_TIMEOUT_MS}",
        },
    }


_lock = threading.Lock()
_engine: Engine | None = None
_engine_pid: int | None = None
_engine_url: str | None = None


def get_engine(url: str | None = None) -> Engine:
    """The process's engine; a forked child (prefork) gets a fresh one, never the parent's pool."""
    global _engine, _engine_pid, _engine_url
    url = url or get_settings().database_url
    with _lock:
        if _engine is not None and (_engine_pid != os.getpid() or _engine_url != url):
            if _engine_pid == os.getpid():
                _engine.dispose()
            else:
                # Inherited sockets belong to the parent: drop them without closing them.
                _engine.dispose(close=False)
            _engine = None
        if _engine is None:
            _engine = create_engine(
                url, pool_pre_ping=True, pool_size=5, max_overflow=10, **engine_options()
            )
            _engine_pid = os.getpid()
            _engine_url = url
        return _engine


def dispose_engine() -> None:
    global _engine
    with _lock:
        if _engine is not None:
            _engine.dispose()
            _engine = None


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
