"""Runs as the harness sees them: create a row, wait until it is terminal, read it back.

Reads use the harness's own engine (never the worker's), so an assertion only ever sees what
the worker committed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from sqlalchemy import Engine, create_engine, text

from harness.core.errors import CheckFailed
from harness.core.poll import poll_until
from harness.core.target import RunTable, Target, default_target

__all__ = [
    "RESET_LOCK_KEY",
    "RunNotTerminalError",
    "RunRow",
    "RunStore",
    "reset_tables",
]

# A Postgres advisory lock (per database): runs that must not lose their row to a reset hold it
# shared (:meth:`RunStore.no_reset`), a reset takes it exclusively (:func:`reset_tables`).
RESET_LOCK_KEY: Final = 0x1A5E_7AB1


def reset_tables(engine: Engine, tables: Sequence[str]) -> None:
    """Empty ``tables`` and restart their ids, once no run that holds off resets is in flight
    (the farm's warm-up runs go on while the first tests run, on the same database)."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": RESET_LOCK_KEY})
        conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY"))


class RunRow(Mapping[str, Any]):
    """One run's row, exactly as stored: its columns (the Target's ``RunTable.columns``) by
    name, as items and as attributes (``row.status``, ``row.error_message``)."""

    __slots__ = ("_runs", "_values")

    def __init__(self, runs: RunTable, values: Mapping[str, Any]) -> None:
        missing = [c for c in runs.columns if c not in values]
        if missing:
            raise ValueError(f"a {runs.table} row lacks {missing}")
        self._runs = runs
        self._values = MappingProxyType({c: values[c] for c in runs.columns})

    def __getitem__(self, column: str) -> Any:
        return self._values[column]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, column: str) -> Any:
        try:
            return self._values[column]
        except KeyError:
            raise AttributeError(f"{self._runs.table} has no column {column!r}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunRow) and dict(self._values) == dict(other._values)

    def __hash__(self) -> int:
        return hash((self._runs.table, self._values[self._runs.id]))

    def __repr__(self) -> str:
        return f"RunRow({dict(self._values)!r})"

    @property
    def status(self) -> str:
        return str(self._values[self._runs.status])

    @property
    def terminal(self) -> bool:
        return self._runs.is_terminal(self._values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


class RunNotTerminalError(CheckFailed):
    """A run did not reach ``success`` or ``failed`` in time; carries its last row."""

    def __init__(self, message: str, row: RunRow | None) -> None:
        super().__init__(message)
        self.row = row


class RunStore:
    """The harness's window on the Target's runs' table, on a connection of its own."""

    def __init__(self, database_url: str | Engine, target: Target | None = None) -> None:
        self.target = target or default_target()
        self.runs = self.target.runs
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

    @contextlib.contextmanager
    def no_reset(self) -> Iterator[None]:
        """While inside, :func:`reset_tables` on this database waits: for runs that go on
        beside the tests (a worker's warm-up) and must keep their rows and ids."""
        with self._engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock_shared(:key)"), {"key": RESET_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(
                    text("SELECT pg_advisory_unlock_shared(:key)"), {"key": RESET_LOCK_KEY}
                )
                conn.commit()

    def create(self, **values: object) -> int:
        """Insert a run as the app does (``RunTable.insert`` for what is not given); its id."""
        row = {**self.runs.insert, **values}
        unknown = [c for c in row if c not in self.runs.columns]
        if unknown:
            raise ValueError(f"{self.runs.table} has no column(s) {unknown}")
        names = ", ".join(row)
        params = ", ".join(f":{c}" for c in row)
        sql = f"INSERT INTO {self.runs.table} ({names}) VALUES ({params}) RETURNING {self.runs.id}"
        with self._engine.begin() as conn:
            run_id = conn.execute(text(sql), row).scalar_one()
        return int(run_id)

    def get(self, run_id: int) -> RunRow | None:
        values = self.runs.read(self._engine, run_id)
        return None if values is None else RunRow(self.runs, values)

    def read(self, run_id: int) -> RunRow:
        row = self.get(run_id)
        if row is None:
            raise LookupError(f"{self.runs.table} has no row with id {run_id}")
        return row

    def read_many(self, run_ids: Sequence[int]) -> dict[int, RunRow]:
        """The rows of ``run_ids`` as stored now, by id, in one query."""
        sql = text(
            f"SELECT {', '.join(self.runs.columns)} FROM {self.runs.table} "
            f"WHERE {self.runs.id} = ANY(:ids)"
        )
        with self._engine.connect() as conn:
            rows = conn.execute(sql, {"ids": list(run_ids)}).mappings().all()
        return {int(row[self.runs.id]): RunRow(self.runs, dict(row)) for row in rows}

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
        """Rows of one of the Target's tables (``reset_tables``) matching ``where``."""
        if table not in self.target.reset_tables:
            raise ValueError(f"unknown table {table!r}; the Target's: {self.target.reset_tables}")
        clause = " AND ".join(f"{k} = :{k}" for k in where) or "TRUE"
        with self._engine.connect() as conn:
            return int(
                conn.execute(
                    text(f"SELECT count(*) FROM {table} WHERE {clause}"), where
                ).scalar_one()
            )
