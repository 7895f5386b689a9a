"""The matrix as one self-contained HTML page: ``reports/matrix.html``.

No CDN, no font, no fetch: the styles and the few lines of script are inline, so the file opens
from a CI artifact, offline. The page shows the coloured grid (loop modes by pool x broker),
each cell with its status, scenario count and median run duration; a click on a cell opens its
scenarios with their outcome, timings, and for a failure its whole text (the row diff and the
run's worker log lines). Above the grid: the versions, the backend, the machine, and for a
merged report each shard's wall time.

The grid is rendered here, not by the script: without JavaScript the page still shows it, and
every cell's scenarios are in the page, one ``<section>`` each.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from harness.core.cell import Cell
from harness.matrix.report import (
    EXIT_OK,
    VERSION_KEYS,
    CellSummary,
    MatrixResult,
    TestRecord,
    format_ms,
    label_of,
    verdict_word,
    write_atomic,
)

__all__ = ["cell_anchor", "render_flake_html", "render_html", "write_html"]

_STATUS_TEXT: Final = {
    "pass": "pass",
    "fail": "FAIL",
    "skipped": "skipped",
    "interrupted": "INTERRUPTED",
    "not_run": "NOT RUN",
}

_STYLE: Final = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1b1f23; }
h1 { font-size: 1.4em; margin: 0 0 .4em; }
.verdict-pass { color: #1a7f37; } .verdict-fail, .verdict-error { color: #cf222e; }
table { border-collapse: collapse; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
table.facts th { background: #f6f8fa; font-weight: 600; }
table.grid th { background: #f6f8fa; }
button.cell { width: 100%; border: 0; padding: 6px 8px; font: inherit; cursor: pointer;
  text-align: left; border-radius: 3px; }
button.cell.pass { background: #dafbe1; } button.cell.fail { background: #ffcecb; }
button.cell.skipped { background: #eaeef2; } button.cell.interrupted { background: #fff1c2; }
button.cell.not_run { background: #f6f8fa; color: #57606a; }
button.cell.selected { outline: 3px solid #0969da; }
td.na { color: #8c959f; text-align: center; }
section.cell-detail { display: none; margin-top: 1.2em; }
section.cell-detail.open { display: block; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; white-space: pre-wrap;
  max-height: 40em; }
pre.message { background: #fff5f5; border-left: 4px solid #cf222e; }
.outcome-failed, .outcome-interrupted { color: #cf222e; font-weight: 600; }
.outcome-passed { color: #1a7f37; } .outcome-skipped { color: #57606a; }
ul.problems li { margin: .2em 0; }
"""

# Opens the clicked cell's section and marks the cell; the hash keeps a link to one cell.
_SCRIPT: Final = """
function openCell(id) {
  document.querySelectorAll('section.cell-detail').forEach(function (s) {
    s.classList.toggle('open', s.id === id);
  });
  document.querySelectorAll('button.cell').forEach(function (b) {
    b.classList.toggle('selected', b.dataset.target === id);
  });
  var open = document.getElementById(id);
  if (open) { open.scrollIntoView({block: 'nearest'}); }
}
document.querySelectorAll('button.cell').forEach(function (b) {
  b.addEventListener('click', function () {
    history.replaceState(null, '', '#' + b.dataset.target);
    openCell(b.dataset.target);
  });
});
if (location.hash) { openCell(location.hash.slice(1)); }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def cell_anchor(cell: Cell) -> str:
    """The id of a cell's section: ``cell-running_loop-prefork-redis``."""
    return f"cell-{cell.id}"


def _cell_button(summary: CellSummary) -> str:
    if summary.status == "fail":
        count = f"{summary.failed}/{summary.scenarios} failed"
    elif summary.status == "interrupted":
        count = f"{summary.passed}/{summary.scenarios} passed"
    else:
        count = f"{summary.scenarios} scenario" + ("" if summary.scenarios == 1 else "s")
    return (
        f'<button class="cell {summary.status}" data-target="{_e(cell_anchor(summary.cell))}" '
        f'data-status="{summary.status}" title="{_e(summary.cell.label)}">'
        f"<b>{_STATUS_TEXT[summary.status]}</b><br>{_e(count)}<br>"
        f"median {format_ms(summary.median_run_ms)}</button>"
    )


def _grid(result: MatrixResult, summaries: Mapping[Cell, CellSummary]) -> str:
    columns = [(pool, broker) for broker in result.brokers for pool in result.pools]
    head = "".join(f"<th>{_e(pool)}/{_e(broker)}</th>" for pool, broker in columns)
    rows = []
    for mode in result.loop_modes:
        cells = []
        for index, (pool, broker) in enumerate(columns):
            cell = Cell(mode) if mode == "in_process" else Cell(mode, pool, broker)
            found = summaries.get(cell) if mode != "in_process" or index == 0 else None
            cells.append(
                f"<td>{_cell_button(found)}</td>" if found is not None else '<td class="na">·</td>'
            )
        rows.append(f"<tr><th>{_e(mode)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="grid" id="grid"><thead><tr><th>loop mode</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _facts(result: MatrixResult) -> str:
    rows: list[tuple[str, str]] = []
    for key in VERSION_KEYS:
        value = result.versions.get(key)
        if value:
            rows.append((key, str(value)))
    served = result.served_by or {}
    backend = str(served.get("backend") or result.services)
    images = ", ".join(f"{k} {v}" for k, v in (served.get("images") or {}).items() if v)
    rows.append(("backend", backend + (f" ({images})" if images else "")))
    m = result.machine
    if m:
        load = m.get("load")
        rows.append(
            (
                "machine",
                f"{m.get('hostname')}: {m.get('system')} {m.get('arch')}, {m.get('cpus')} cores"
                + (f", load {' '.join(str(x) for x in load)}" if load else ""),
            )
        )
    if result.wall_s is not None:
        rows.append(("wall time", f"{result.wall_s:.1f} s"))
    if result.shard is not None:
        rows.append(("shard", f"{result.shard} of the selection"))
    for shard in result.shards:
        wall = shard.get("wall_s")
        rows.append(
            (
                f"shard {shard.get('index')}/{shard.get('total')}",
                f"{len(shard.get('cells') or [])} cells, "
                + (f"{wall:.1f} s" if isinstance(wall, int | float) else "no wall time")
                + f", exit code {shard.get('exit_code')}",
            )
        )
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="facts" id="facts">{body}</table>'


def _scenario(record: TestRecord) -> str:
    runs = ", ".join(format_ms(ms) for ms in record.run_durations_ms) or "-"
    head = (
        f'<tr><td>{_e(record.nodeid)}</td><td class="outcome-{record.outcome}">'
        f"{_e(record.outcome)}</td><td>{record.duration_s:.2f} s</td><td>{_e(runs)}</td>"
        f"<td>{_e(record.celery_worker or '-')}</td></tr>"
    )
    if not record.message and not record.details:
        return head
    # The one-line verdict and the row diff first; the traceback and the log lines below it.
    message = f'<pre class="message">{_e(record.message)}</pre>' if record.message else ""
    details = (
        f"<details open><summary>the whole failure: traceback, row diff, log lines</summary>"
        f'<pre class="details">{_e(record.details)}</pre></details>'
        if record.details
        else ""
    )
    return f'{head}<tr><td colspan="5">{message}{details}</td></tr>'


def _section(anchor: str, title: str, records: Iterable[TestRecord], note: str = "") -> str:
    rows = "".join(_scenario(r) for r in records)
    table = (
        "<table><thead><tr><th>scenario</th><th>outcome</th><th>time</th><th>runs</th>"
        f"<th>Celery worker</th></tr></thead><tbody>{rows}</tbody></table>"
        if rows
        else "<p>No scenario ran in this cell.</p>"
    )
    return (
        f'<section class="cell-detail" id="{_e(anchor)}"><h2>{_e(title)}</h2>'
        f"{f'<p>{_e(note)}</p>' if note else ''}{table}</section>"
    )


def render_html(result: MatrixResult, *, title: str = "ingest-harness matrix") -> str:
    summaries = {s.cell: s for s in result.cells()}
    by_cell: dict[Cell, list[TestRecord]] = {cell: [] for cell in summaries}
    for record in result.records:
        if record.cell in by_cell:
            by_cell[record.cell].append(record)
    verdict = verdict_word(result.exit_code)
    sections = [
        _section(cell_anchor(cell), f"{cell.label}: {_STATUS_TEXT[summaries[cell].status]}",
                 records, summaries[cell].skip_reason or "")
        for cell, records in by_cell.items()
    ]  # fmt: skip
    others = result.unassigned()
    problems = [f"<li>error: <pre>{_e(error)}</pre></li>" for error in result.errors]
    if others:
        problems.append('<li><button class="cell other" data-target="other-tests">'
                        f"{len(others)} test(s) outside the grid</button></li>")  # fmt: skip
        sections.append(_section("other-tests", "Tests outside the grid", others))
    problem_list = f'<ul class="problems">{"".join(problems)}</ul>' if problems else ""
    counts = ", ".join(
        f"{n} {text}"
        for status, text in _STATUS_TEXT.items()
        if (n := sum(s.status == status for s in summaries.values()))
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}: {verdict}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{_e(title)}: <span id="verdict" class="verdict-{verdict.lower()}">{verdict}</span></h1>
<p id="counts">{len(summaries)} cells: {_e(counts or "none")}. Click a cell for its scenarios.</p>
{_facts(result)}
<h2>Cells: status, scenarios, median run duration</h2>
{_grid(result, summaries)}
{problem_list}
{"".join(sections)}
<script>{_SCRIPT}</script>
</body></html>
"""


def write_html(path: Path, result: MatrixResult, *, title: str = "ingest-harness matrix") -> None:
    write_atomic(path, render_html(result, title=title))


def render_flake_html(
    command: str,
    runs: int,
    summaries: Sequence[Mapping[str, Any]],
    non_passes: Sequence[Mapping[str, Any]],
    verdict: str,
    *,
    base: Path,
) -> str:
    """``harness flake`` / ``stress``: a row per run, linking to that run's own HTML report
    (a link relative to ``base``, the page's directory: nothing is fetched), then every
    non-pass."""
    rows = []
    for s in summaries:
        page = os.path.relpath(Path(str(s.get("report", ""))).with_suffix(".html"), base)
        status = "pass" if s["exit_code"] == EXIT_OK else "fail"
        rows.append(
            f'<tr><td>{s["run"]}</td><td><a class="cell {status}" href="{_e(page)}">'
            f"{_STATUS_TEXT[status]}</a></td><td>{s['passed']}</td><td>{s['failed']}</td>"
            f"<td>{s['skipped']}</td><td>{s['cells_passed']}/{s['cells']}</td>"
            f"<td>{s['duration_s']:.1f} s</td></tr>"
        )
    items = []
    for item in non_passes:
        where = label_of(item)
        items.append(
            f"<li>run {item['run']} <code>{_e(where)}</code> <code>{_e(item.get('test') or '-')}"
            f"</code> {_e(item['outcome'])}<pre>{_e(item.get('message') or '')}</pre></li>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ingest-harness {_e(command)}: {verdict}</title>
<style>{_STYLE}</style></head>
<body>
<h1>ingest-harness {_e(command)}:
<span id="verdict" class="verdict-{verdict.lower()}">{verdict}</span></h1>
<p>{len(summaries)} of {runs} runs completed; {len(non_passes)} non-pass(es). Each run's own
report opens from its row.</p>
<table id="runs"><thead><tr><th>run</th><th>verdict</th><th>passed</th><th>failed</th>
<th>skipped</th><th>cells passing</th><th>time</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<ul class="problems">{"".join(items)}</ul>
</body></html>
"""
