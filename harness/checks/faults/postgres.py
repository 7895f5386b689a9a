"""Postgres faults: terminate the app's backends once (``terminate_backends``) or on every
new connection for a while (``BackendTerminator``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import psycopg2

from harness.checks.faults._settings import logger
from harness.services._base import libpq_dsn

__all__ = ["Backend", "BackendTerminator", "terminate_backends"]


@dataclass(frozen=True, slots=True)
class Backend:
    """A Postgres session that :func:`terminate_backends` ended."""

    pid: int
    application_name: str
    state: str | None
    backend_type: str


def terminate_backends(database_url: str) -> list[Backend]:
    """``pg_terminate_backend`` every other session of the database; return the ones it ended.

    What an administrator, a failover or a connection-pooler restart does to the service: every
    connection the worker holds (the job's async one mid-transaction, the task's pooled sync
    ones) is closed by the server, with ``FATAL: terminating connection due to administrator
    command``.
    """
    conn = psycopg2.connect(libpq_dsn(database_url), connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            # The call in the select list, not in WHERE: Postgres may evaluate WHERE's terms in
            # any order, and would then end this very session too.
            cur.execute(
                "SELECT pid, application_name, state, backend_type, pg_terminate_backend(pid)"
                " FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            ended = [
                Backend(int(pid), str(app or ""), state, str(kind))
                for pid, app, state, kind, done in cur.fetchall()
                if done
            ]
    finally:
        conn.close()
    logger.debug("terminated %d backends: %s", len(ended), ended)
    return ended


class BackendTerminator:
    """A database that keeps dropping connections: :func:`terminate_backends` every ``every_s``
    in a thread, from ``__enter__`` until ``__exit__`` (a failover that flaps, a pooler that
    restarts in a loop). ``ended`` collects every session it ended.

    While it runs, the harness's own connections to the database die too: read rows after
    the ``with`` block.
    """

    def __init__(self, database_url: str, *, every_s: float = 0.02) -> None:
        self.database_url = database_url
        self.every_s = every_s
        self.ended: list[Backend] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="terminate-backends", daemon=True)
        self._error: BaseException | None = None

    def _loop(self) -> None:
        try:
            while True:
                self.ended.extend(terminate_backends(self.database_url))
                self.rounds += 1
                if self._stop.wait(self.every_s):
                    return
        except BaseException as exc:  # surfaced by __exit__, in the test's thread
            self._error = exc

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._error is not None and exc is None:
            raise self._error
