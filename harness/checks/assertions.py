"""Assertions on a run's row and its worker log lines, with a readable diff when they fail.

Each helper checks everything the runbook's steps 3 and 4 check by eye and, on failure, shows
the row field by field (expected vs actual) and the run's log lines, so a red scenario explains
itself without opening the worker log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.core.errors import CheckFailed
from harness.core.logs import (
    COMPLETED_TEMPLATE,
    FAILED_TEMPLATE,
    FORBIDDEN_TEXT,
    SHARED_LOOP_RE,
    STARTING_TEMPLATE,
    STRATEGY_THREAD_POOL,
    LogLine,
    find_forbidden,
    harness_lines,
    runner_lines,
    task_lines,
    trace_lines,
)
from harness.core.runs import RunRow
from harness.workers.loopmodes import expected_runner_line

__all__ = [
    "RunAssertionError",
    "assert_celery_agrees",
    "assert_loop_log",
    "assert_run_failed",
    "assert_run_succeeded",
    "run_log_excerpt",
]

_ROW_FIELDS = (
    "id",
    "project_id",
    "marketplace_code",
    "job_code",
    "status",
    "started_at",
    "finished_at",
    "duration_ms",
    "stats_json",
    "error_message",
    "heartbeat_at",
)


class RunAssertionError(CheckFailed):
    """A run did not end as expected; the message holds the diff and the run's log lines."""


@dataclass
class _Check:
    """Collects every mismatch before failing, so one failure shows the whole picture."""

    row: RunRow | None
    problems: list[str] = field(default_factory=list)
    expected: dict[str, Any] = field(default_factory=dict)

    def expect(self, name: str, ok: bool, expected: str, problem: str | None = None) -> None:
        self.expected[name] = expected
        if not ok:
            self.problems.append(problem or f"{name}: expected {expected}")

    def fail_if_any(self, title: str, log: Sequence[LogLine] | None, run_id: int) -> None:
        if not self.problems:
            return
        parts = [title, *(f"  - {p}" for p in self.problems)]
        if self.row is not None:
            parts.append(_row_table(self.row, self.expected))
        if log is not None:
            parts.append(run_log_excerpt(log, run_id))
        raise RunAssertionError("\n".join(parts))


def _row_table(row: RunRow, expected: Mapping[str, str]) -> str:
    actual = row.as_dict()
    width = max(len(f) for f in _ROW_FIELDS)
    lines = [f"ingest_runs row {row.id}:", f"  {'column':<{width}}  {'actual':<40}  expected"]
    for name in _ROW_FIELDS:
        value = repr(actual[name])
        if len(value) > 200:
            value = value[:197] + "..."
        want = expected.get(name, "")
        marker = "!" if want and name in expected and _mismatch(name, expected, actual) else " "
        lines.append(f"{marker} {name:<{width}}  {value:<40}  {want}")
    return "\n".join(lines)


def _mismatch(name: str, expected: Mapping[str, str], actual: Mapping[str, Any]) -> bool:
    # Only used to put a marker in the table; the checks themselves decided pass or fail.
    want = expected[name]
    return want.startswith("== ") and repr(actual[name]) != want[3:]


def run_log_excerpt(lines: Sequence[LogLine], run_id: int, limit: int = 40) -> str:
    """The worker log lines that belong to one run (task, runner, harness shim lines)."""
    own = {id(line) for line in task_lines(lines, run_id)}
    own |= {id(r.line) for r in runner_lines(lines, run_id)}
    own |= {id(line) for line in harness_lines(lines, run_id)}
    selected = [line for line in lines if id(line) in own]
    if not selected:
        tail = [line.raw for line in lines[-10:]]
        return "worker log: no line for run {}; last lines:\n    {}".format(
            run_id, "\n    ".join(tail) if tail else "(empty log)"
        )
    text = "\n    ".join(line.raw for line in selected[-limit:])
    return f"worker log lines for run {run_id}:\n    {text}"


def _check_timing(check: _Check, row: RunRow) -> None:
    started, finished = row.started_at, row.finished_at
    check.expect("started_at", started is not None, "not null")
    check.expect("finished_at", finished is not None, "not null")
    check.expect("duration_ms", row.duration_ms is not None, "not null")
    if started is None or finished is None or row.duration_ms is None:
        return
    check.expect(
        "started_at",
        started.tzinfo is not None and finished.tzinfo is not None,
        "timezone-aware",
        "started_at/finished_at are not timezone-aware",
    )
    check.expect(
        "finished_at",
        started <= finished,
        ">= started_at",
        f"finished_at {finished.isoformat()} is before started_at {started.isoformat()}",
    )
    diff_ms = (finished - started).total_seconds() * 1000
    check.expect(
        "duration_ms",
        abs(row.duration_ms - diff_ms) <= 1,
        f"finished_at - started_at = {diff_ms:.3f} ms (within 1)",
        f"duration_ms {row.duration_ms} is not finished_at - started_at = {diff_ms:.3f} ms",
    )


def assert_run_succeeded(
    row: RunRow,
    *,
    log: Sequence[LogLine] | None = None,
    project_id: int | None = None,
    domain: str | None = None,
    marketplace: str | None = None,
    fetched: int | None = None,
    pages: int | None = None,
) -> None:
    """The runbook's step 4 for a good run: success, times set and consistent, stats, no error."""
    check = _Check(row)
    check.expect(
        "status",
        row.status == "success",
        "== 'success'",
        f"status is {row.status!r}, expected 'success'",
    )
    _check_timing(check, row)
    check.expect(
        "error_message",
        row.error_message is None,
        "== None",
        f"error_message is {row.error_message!r}, expected None",
    )
    stats = row.stats_json or {}
    check.expect("stats_json", bool(row.stats_json), "not empty", "stats_json is empty")
    expected_stats: dict[str, Any] = {"ok": True}
    if project_id is not None:
        expected_stats["project_id"] = project_id
    if domain is not None:
        expected_stats["domain"] = domain
    if marketplace is not None:
        expected_stats["marketplace"] = marketplace
    if fetched is not None:
        expected_stats["fetched"] = fetched
    if pages is not None:
        expected_stats["pages"] = pages
    wrong = {
        k: (stats.get(k, "<missing>"), v) for k, v in expected_stats.items() if stats.get(k) != v
    }
    check.expect(
        "stats_json",
        not wrong,
        f"has {expected_stats}",
        "stats_json differs: "
        + ", ".join(f"{k}: got {g!r}, want {w!r}" for k, (g, w) in wrong.items()),
    )
    if fetched is not None and not wrong:
        counted = stats.get("inserted", 0) + stats.get("updated", 0)
        check.expect(
            "stats_json",
            counted == fetched,
            "inserted + updated == fetched",
            f"inserted + updated = {counted}, fetched = {fetched}",
        )
    check.fail_if_any(f"run {row.id} did not succeed as expected:", log, row.id)


def assert_run_failed(
    row: RunRow,
    *,
    error: str | re.Pattern[str] | None = None,
    log: Sequence[LogLine] | None = None,
) -> None:
    """A failed run: status failed, times set, an error_message (matching ``error``), no stats."""
    check = _Check(row)
    check.expect(
        "status",
        row.status == "failed",
        "== 'failed'",
        f"status is {row.status!r}, expected 'failed'",
    )
    _check_timing(check, row)
    message = row.error_message or ""
    check.expect("error_message", bool(message), "not empty", "error_message is empty")
    if error is not None and message:
        matched = (
            error.search(message) is not None if isinstance(error, re.Pattern) else error in message
        )
        want = error.pattern if isinstance(error, re.Pattern) else error
        check.expect(
            "error_message",
            matched,
            f"contains {want!r}",
            f"error_message {message!r} does not contain {want!r}",
        )
    check.fail_if_any(f"run {row.id} did not fail as expected:", log, row.id)


def assert_loop_log(
    lines: Sequence[LogLine],
    run_id: int,
    mode: str,
    *,
    outcome: str = "success",
    error: str | None = None,
    job_code: str = "frontend_prices",
    forbidden_anywhere: Iterable[LogLine] | None = None,
) -> None:
    """The runbook's step 3: one runner line for the run with the mode's expected strategy, then
    ``Starting run N`` before ``Run N completed successfully`` (or ``Run N failed: ...``), and the
    pre-fix error nowhere in the log (``forbidden_anywhere``, default: ``lines``).

    A run that the shim saw start under another greenlet's running loop (gevent, several runs
    in flight: ``SHARED_LOOP_TEMPLATE``) is in the running-loop condition whatever its mode, so
    the runner must have detected the loop and used the thread pool."""
    problems: list[str] = []
    detected, strategy = expected_runner_line(mode)
    if any(SHARED_LOOP_RE.match(line.headline) for line in harness_lines(lines, run_id)):
        detected, strategy = True, STRATEGY_THREAD_POOL
    want_runner = (
        f"run_async_safe: detected_running_loop={detected}, using {strategy} "
        f"(context: {{'run_id': {run_id}, 'job_code': {job_code!r}}})"
    )
    runners = runner_lines(lines, run_id)
    if len(runners) != 1:
        problems.append(f"expected exactly one runner line for run {run_id}, found {len(runners)}")
    elif runners[0].line.headline != want_runner:
        problems.append(
            "runner line differs:\n"
            f"      got:  {runners[0].line.headline}\n      want: {want_runner}"
        )
    got_task = [line.headline for line in task_lines(lines, run_id)]
    end: str | None
    if outcome == "success":
        end = COMPLETED_TEMPLATE.format(run_id=run_id)
    else:
        end = FAILED_TEMPLATE.format(run_id=run_id, error=error) if error else None
    want_task = [STARTING_TEMPLATE.format(run_id=run_id)]
    if end is not None:
        want_task.append(end)
    if end is None:
        failed_prefix = f"Run {run_id} failed: "
        ok = (
            len(got_task) == 2
            and got_task[0] == want_task[0]
            and got_task[1].startswith(failed_prefix)
        )
        if not ok:
            problems.append(
                f"task lines differ: got {got_task}, want [{want_task[0]!r}, '{failed_prefix}...']"
            )
    elif got_task != want_task:
        problems.append(f"task lines differ: got {got_task}, want {want_task}")
    if runners and got_task:
        start_line = next(
            (line for line in lines if line.headline == STARTING_TEMPLATE.format(run_id=run_id)),
            None,
        )
        order = list(lines)
        if start_line is not None and order.index(start_line) > order.index(runners[0].line):
            problems.append("the runner line comes before 'Starting run N'")
    bad = find_forbidden(lines if forbidden_anywhere is None else forbidden_anywhere)
    if bad:
        problems.append(
            f"the log contains {FORBIDDEN_TEXT!r} ({len(bad)} records), first: {bad[0].headline}"
        )
    if problems:
        raise RunAssertionError(
            "\n".join(
                [f"worker log for run {run_id} ({mode}) is not as the runbook says:"]
                + [f"  - {p}" for p in problems]
                + [run_log_excerpt(lines, run_id)]
            )
        )


# Celery's own word on the task (celery.app.trace): as the row says, and without a traceback.
_CELERY_SUCCEEDED = re.compile(r"^Task \S+\[(?P<id>[^\]]+)\] succeeded in ")
_CELERY_FAILED = re.compile(r"^Task \S+\[(?P<id>[^\]]+)\] raised expected: RunFailed\(")


def assert_celery_agrees(lines: Iterable[LogLine], task_id: str, row: RunRow) -> None:
    """Celery's end line for ``task_id`` says what the row says: ``succeeded`` for a
    ``success`` row, ``raised expected: RunFailed`` for a ``failed`` one, with no traceback
    (the run's own error line has said what happened). Result backends and Flower show what
    this line says."""
    ends = trace_lines(lines, task_id)
    pattern = _CELERY_SUCCEEDED if row.status == "success" else _CELERY_FAILED
    said = "succeeded" if row.status == "success" else "raised expected: RunFailed(...)"
    problems = []
    if len(ends) != 1:
        problems.append(f"expected one end line from Celery for task {task_id}, got {len(ends)}")
    elif pattern.match(ends[0].headline) is None:
        problems.append(f"Celery's end line should say {said!r}")
    elif ends[0].message != ends[0].headline:
        problems.append("Celery's end line carries a traceback; the run's error line says it all")
    if problems:
        shown = "\n".join(f"  {line.raw}" for line in ends) or "  (none)"
        raise RunAssertionError(
            f"run {row.id} is {row.status!r} but Celery disagrees: {'; '.join(problems)}\n"
            f"Celery's lines for the task:\n{shown}"
        )
