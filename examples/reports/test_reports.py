"""The harness against a second app, unchanged: the loop-mode matrix and the pre-fix proof for
the report service, through its Target (examples/reports/target.py) and nothing else.

Each run is a ``report_jobs`` row made ``pending``, sent to a real Celery worker of the report
service with the loop mode in the message header, and read back once it is terminal: its row
(state, timings, result or failure) and its worker's log lines (the task's, the bridge's and
the harness's shim's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from examples.reports.jobs import expected_result
from examples.reports.target import REPORTS
from harness.core.cell import LOOP_MODES, mode_applies
from harness.core.logs import FORBIDDEN_TEXT, LOOP_MODE_TEMPLATE, LogLine
from harness.core.poll import poll_until
from harness.workers.process import CeleryWorkerProcess

pytestmark = pytest.mark.integration

POOLS = ("solo", "prefork", "threads")
# The loop modes of a solo worker (inherited_loop needs a pool that forks).
SOLO_MODES = tuple(mode for mode in LOOP_MODES if mode_applies(mode, "solo"))
RUNNING = ("running_loop", "running_uvloop")
TENANT = "acme"


def _run(
    worker: CeleryWorkerProcess,
    engine: Engine,
    new_report: Callable[[str, str], int],
    mode: str,
    kind: str = "sales",
) -> tuple[dict[str, Any], list[LogLine]]:
    job_id = new_report(TENANT, kind)
    mark = worker.log_mark()
    worker.send(job_id, loop_mode=mode)
    row = poll_until(
        lambda: (r if (r := REPORTS.runs.read(engine, job_id)) and REPORTS.runs.is_terminal(r)
                 else None),
        timeout=30.0,
    )  # fmt: skip
    assert row is not None, (
        f"report {job_id} not terminal in 30 s: {REPORTS.runs.read(engine, job_id)}\n"
        + worker.read_log(mark)[-2000:]
    )
    end = REPORTS.logs.completed if row["state"] == "done" else REPORTS.logs.failed
    head = end.format(run_id=job_id, error="")
    lines = worker.wait_for_log(
        lambda ls: any(x.headline.startswith(head) for x in ls),
        since=mark,
        what=f"report {job_id}'s last line",
    )
    return row, lines


def _bridge_line(lines: list[LogLine], job_id: int) -> str:
    found = [
        x.headline
        for x in lines
        if x.logger == REPORTS.logs.runner_logger and x.headline.endswith(f"[report {job_id}]")
    ]
    assert len(found) == 1, f"expected one bridge line for report {job_id}, got {found}"
    return found[0]


@pytest.mark.parametrize(
    ("mode", "pool"),
    [(mode, pool) for mode in LOOP_MODES for pool in POOLS if mode_applies(mode, pool)],
)
def test_the_matrix(
    mode: str,
    pool: str,
    reports_workers: Callable[[str, str], CeleryWorkerProcess],
    reports_engine: Engine,
    new_report: Callable[[str, str], int],
) -> None:
    row, lines = _run(reports_workers(pool, "fixed"), reports_engine, new_report, mode)

    assert row["state"] == "done", f"{row}\n" + "\n".join(x.raw for x in lines)
    assert row["result"] == expected_result(TENANT, "sales")
    assert row["failure"] is None
    assert row["begun_at"] is not None and row["ended_at"] >= row["begun_at"]
    assert row["elapsed_ms"] is not None and row["elapsed_ms"] >= 0
    job_id = row["id"]
    heads = [x.headline for x in REPORTS.logs.run_lines(lines, job_id)]
    assert heads == [
        REPORTS.logs.starting.format(run_id=job_id),
        REPORTS.logs.completed.format(run_id=job_id),
    ]
    running = mode in RUNNING
    assert _bridge_line(lines, job_id) == (
        f"bridge: loop_running={running}, via {'thread' if running else 'run'} [report {job_id}]"
    )
    shim = LOOP_MODE_TEMPLATE.format(run_id=job_id, mode=mode, source="header harness_loop_mode")
    assert any(x.headline == shim for x in lines), "the harness's shim did not force the mode"
    assert not [x for x in lines if FORBIDDEN_TEXT in x.message]


@pytest.mark.parametrize("mode", SOLO_MODES)
def test_a_failing_report_ends_error(
    mode: str,
    reports_workers: Callable[[str, str], CeleryWorkerProcess],
    reports_engine: Engine,
    new_report: Callable[[str, str], int],
) -> None:
    row, lines = _run(reports_workers("solo", "fixed"), reports_engine, new_report, mode, "broken")

    assert row["state"] == "error" and row["result"] is None
    assert row["failure"] == "ValueError: report kind 'broken' has no template"
    job_id = row["id"]
    heads = [x.headline for x in REPORTS.logs.run_lines(lines, job_id)]
    assert heads[-1] == REPORTS.logs.failed.format(run_id=job_id, error=row["failure"])


@pytest.mark.parametrize("mode", SOLO_MODES)
def test_the_pre_fix_runner_fails_exactly_the_running_modes(
    mode: str,
    reports_workers: Callable[[str, str], CeleryWorkerProcess],
    reports_engine: Engine,
    new_report: Callable[[str, str], int],
) -> None:
    """The bridge swapped for a plain asyncio.run (HARNESS_RUNNER=prefix): the harness must
    see the runbook's bug in the running modes, and nothing wrong in the others."""
    row, _ = _run(reports_workers("solo", "prefix"), reports_engine, new_report, mode)

    if mode in RUNNING:
        assert row["state"] == "error", row
        assert row["failure"] == f"RuntimeError: {FORBIDDEN_TEXT}", row
    else:
        assert row["state"] == "done", row
        assert row["result"] == expected_result(TENANT, "sales")
