"""The matrix as Markdown: ``reports/matrix.md``, and CI's step summary.

``harness matrix`` writes it beside its JSON report, and appends it to the file that
``$GITHUB_STEP_SUMMARY`` names when that variable is set (GitHub Actions shows that file on the
run's page). It holds the grid with a status mark in each cell and, below it, one line per
failure, skip and error: what a reviewer reads before opening the log.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from harness.core.cell import Cell
from harness.matrix.report import (
    EXIT_OK,
    CellSummary,
    MatrixResult,
    format_ms,
    label_of,
    verdict_word,
    write_atomic,
)

__all__ = [
    "STEP_SUMMARY_ENV",
    "publish_markdown",
    "publish_text",
    "render_flake_markdown",
    "render_markdown",
]

STEP_SUMMARY_ENV: Final = "GITHUB_STEP_SUMMARY"
_MARKS: Final = {
    "pass": "✅",
    "fail": "❌",
    "skipped": "⏭️",
    "interrupted": "⚠️",
    "not_run": "⬜",
}
_NOT_APPLICABLE: Final = "·"


def _escape(text: str) -> str:
    """One table cell or list item: a single line, with no ``|`` to split a table row."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first.replace("|", "\\|")


def _cell(summary: CellSummary) -> str:
    mark = _MARKS[summary.status]
    median = format_ms(summary.median_run_ms)
    if summary.status == "pass":
        return f"{mark} pass {summary.scenarios} · {median}"
    if summary.status == "fail":
        return f"{mark} FAIL {summary.failed}/{summary.scenarios} · {median}"
    if summary.status == "skipped":
        return f"{mark} skipped {summary.scenarios}"
    if summary.status == "interrupted":
        return f"{mark} INTERRUPTED {summary.passed}/{summary.scenarios}"
    return f"{mark} NOT RUN"


def render_markdown(result: MatrixResult, *, title: str = "ingest-harness matrix") -> str:
    """The grid (loop modes by pool x broker) with status marks, then one line per problem."""
    cells = result.cells()
    verdict = verdict_word(result.exit_code)
    counts = ", ".join(
        f"{n} {status.replace('_', ' ')}"
        for status in _MARKS
        if (n := sum(c.status == status for c in cells))
    )
    columns = [(pool, broker) for broker in result.brokers for pool in result.pools]
    summaries: Mapping[Cell, CellSummary] = {s.cell: s for s in cells}
    lines = [
        f"## {title}: {verdict}",
        "",
        f"{len(cells)} cells: {counts or 'none'}",
        "",
        "| loop mode | " + " | ".join(f"{pool}/{broker}" for pool, broker in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for mode in result.loop_modes:
        row = []
        for index, (pool, broker) in enumerate(columns):
            cell = Cell(mode) if mode == "in_process" else Cell(mode, pool, broker)
            found = summaries.get(cell) if mode != "in_process" or index == 0 else None
            row.append(_cell(found) if found is not None else _NOT_APPLICABLE)
        lines.append(f"| {mode} | " + " | ".join(row) + " |")
    problems = [f"- ⚠️ error: {_escape(error)}" for error in result.errors]
    for summary in cells:
        for test, message in summary.failures:
            problems.append(f"- ❌ `{summary.cell.label}` `{test}`: {_escape(message)}")
        if summary.skip_reason:
            problems.append(f"- ⏭️ `{summary.cell.label}`: {_escape(summary.skip_reason)}")
    for record in result.unassigned():
        if record.outcome == "failed":
            problems.append(f"- ❌ `{record.nodeid}`: {_escape(record.message or 'failed')}")
    if problems:
        lines += ["", *problems]
    return "\n".join(lines) + "\n"


def render_flake_markdown(
    command: str,
    runs: int,
    summaries: Sequence[Mapping[str, Any]],
    non_passes: Sequence[Mapping[str, Any]],
    exit_code: int,
) -> str:
    """``harness flake`` / ``stress``: a line per run, then one line per non-pass."""
    verdict = verdict_word(exit_code)
    lines = [
        f"## ingest-harness {command}: {verdict}",
        "",
        f"{len(summaries)} of {runs} runs completed; {len(non_passes)} non-pass(es)",
        "",
        "| run | verdict | passed | failed | skipped | cells passing | time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        mark = "✅" if s["exit_code"] == EXIT_OK else "❌"
        lines.append(
            f"| {s['run']} | {mark} | {s['passed']} | {s['failed']} | {s['skipped']} | "
            f"{s['cells_passed']}/{s['cells']} | {s['duration_s']:.1f} s |"
        )
    if non_passes:
        lines.append("")
    for item in non_passes:
        where = label_of(item)
        lines.append(
            f"- ❌ run {item['run']} `{where}` `{item.get('test') or '-'}` "
            f"{item['outcome']}: {_escape(item.get('message') or '')}"
        )
    return "\n".join(lines) + "\n"


def publish_markdown(
    result: MatrixResult,
    path: Path,
    *,
    title: str = "ingest-harness matrix",
    env: Mapping[str, str] | None = None,
) -> Path | None:
    """Write ``path``; append the same to ``$GITHUB_STEP_SUMMARY`` if set (returned)."""
    return publish_text(render_markdown(result, title=title), path, env=env)


def publish_text(text: str, path: Path, *, env: Mapping[str, str] | None = None) -> Path | None:
    """Write ``text`` to ``path``; append it to ``$GITHUB_STEP_SUMMARY`` if set (returned)."""
    write_atomic(path, text)
    summary = (os.environ if env is None else env).get(STEP_SUMMARY_ENV, "").strip()
    if not summary:
        return None
    with Path(summary).open("a", encoding="utf-8") as out:
        out.write(text + "\n")
    return Path(summary)
