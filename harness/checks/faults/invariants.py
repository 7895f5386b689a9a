"""The one invariant every fault must leave behind (``assert_fault_invariants``): every run
terminal or recovered, no data key stored twice, the rows the successful runs were served, and
no traceback but the provoked ones. What a run and its data are comes from the Target."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import text

from harness.checks.faults._settings import RowsKey
from harness.core.errors import CheckFailed
from harness.core.logs import LogLine, tracebacks
from harness.core.runs import RunRow, RunStore

__all__ = ["FaultInvariantError", "FaultReport", "assert_fault_invariants"]


class FaultInvariantError(CheckFailed):
    """What a fault left behind that it must not: the message lists every problem."""


@dataclass(frozen=True)
class FaultReport:
    """What :func:`assert_fault_invariants` found when everything held."""

    runs: list[RunRow]
    recovered: list[int]
    provoked_tracebacks: list[str]


def _compile(patterns: Iterable[str | re.Pattern[str]]) -> list[re.Pattern[str]]:
    return [p if isinstance(p, re.Pattern) else re.compile(p) for p in patterns]


def assert_fault_invariants(
    store: RunStore,
    worker_log_lines: Sequence[LogLine],
    *,
    provoked: Sequence[str | re.Pattern[str]] = (),
    expected_rows: Mapping[RowsKey, int],
    run_ids: Iterable[int] | None = None,
) -> FaultReport:
    """The invariant after every fault scenario; FaultInvariantError listing what broke.

    - Every run in scope (``run_ids``; default: every row of ``ingest_runs``) is terminal:
      ``success``, or ``failed`` by the task or by ``unlock_stale_runs`` (those are reported as
      ``recovered``). None is left ``queued`` or ``running``.
    - No domain row is duplicated on its business key (the unique constraints guarantee it
      today; this catches one that is dropped), and each domain table holds exactly
      ``expected_rows`` rows per (table, project, marketplace), no more, no fewer and none
      anywhere else: what the successful runs were served, and nothing from a failed one.
    - ``harness.core.logs.tracebacks(worker_log_lines)`` has nothing but the provoked ones:
      ``provoked`` are regular expressions; a traceback matching one of them is expected.
    """
    problems: list[str] = []
    runs_table = store.runs
    data_keys = store.target.data_keys
    if run_ids is None:
        sql = text(f"SELECT {runs_table.id} FROM {runs_table.table} ORDER BY {runs_table.id}")
        with store.engine.connect() as conn:
            ids = [int(i) for i in conn.execute(sql).scalars()]
    else:
        ids = sorted(set(run_ids))
    runs: list[RunRow] = []
    for run_id in ids:
        row = store.get(run_id)
        if row is None:
            problems.append(f"run {run_id}: no such row")
            continue
        runs.append(row)
        if not row.terminal:
            problems.append(
                f"run {run_id} is left {row.status!r} (heartbeat {row.heartbeat_at}, started "
                f"{row.started_at}): neither finished nor recovered by unlock_stale_runs"
            )
    prefix, error = runs_table.recovered_prefix, runs_table.error
    recovered = [
        int(r[runs_table.id])
        for r in runs
        if prefix is not None
        and error is not None
        and r.terminal
        and r.status != runs_table.success
        and (r[error] or "").startswith(prefix)
    ]

    with store.engine.connect() as conn:
        for table, key in data_keys.items():
            columns = ", ".join(key)
            duplicates = conn.execute(
                text(
                    f"SELECT {columns}, count(*) FROM {table} GROUP BY {columns} "
                    "HAVING count(*) > 1 ORDER BY count(*) DESC LIMIT 5"
                )
            ).all()
            for dup in duplicates:
                problems.append(f"{table}: {tuple(dup)[:-1]} is stored {dup[-1]} times")
            counts = {
                (table, int(p), str(m)): int(n)
                for p, m, n in conn.execute(
                    text(
                        f"SELECT project_id, marketplace_code, count(*) FROM {table} "
                        "GROUP BY project_id, marketplace_code"
                    )
                )
            }
            wanted = {k: n for k, n in expected_rows.items() if k[0] == table and n}
            for k in sorted(set(counts) | set(wanted)):
                got, want = counts.get(k, 0), wanted.get(k, 0)
                if got != want:
                    problems.append(
                        f"{table} for project {k[1]}, marketplace {k[2]}: {got} rows, expected "
                        f"{want} (what the successful runs were served; 0 after a failed run)"
                    )
    unknown = {k[0] for k in expected_rows} - set(data_keys)
    if unknown:
        problems.append(f"expected_rows names unknown tables {sorted(unknown)}")

    patterns = _compile(provoked)
    allowed: list[str] = []
    for block in tracebacks(worker_log_lines):
        if any(p.search(block) for p in patterns):
            allowed.append(block)
        else:
            problems.append("an unhandled traceback in a worker log:\n" + _indent(block))

    if problems:
        rows = "\n".join(f"    {r.as_dict()!r}" for r in runs) or "    (no run)"
        raise FaultInvariantError(
            "the fault left behind what it must not:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\n  runs in scope:\n{rows}"
        )
    return FaultReport(runs=runs, recovered=recovered, provoked_tracebacks=allowed)


def _indent(block: str) -> str:
    return "\n".join(f"      {line}" for line in block.splitlines())
