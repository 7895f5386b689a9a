"""Collect matrix outcomes from pytest reports, aggregate them per cell, render and serialize.

`MatrixCollector` is a pytest plugin object for ``pytest.main(args, plugins=[collector])``; it
only reads reports (``pytest_runtest_logreport`` runs on the xdist controller too), so the rest
of this module is plain data and functions, unit-testable without running pytest.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import pytest

from harness.core.cell import BROKERS, CELL_PROPERTY, MATRIX_MODES, POOLS, Cell
from harness.core.config import HarnessConfig
from harness.core.shard import Shard
from harness.matrix.facts import VERSION_KEYS, machine

__all__ = [
    "CELERY_WORKER_PROPERTY",
    "EXIT_ERROR",
    "EXIT_NOT_PASSED",
    "EXIT_OK",
    "RUN_DURATION_PROPERTY",
    "VERSION_KEYS",
    "CellSummary",
    "MatrixCollector",
    "MatrixResult",
    "TestRecord",
    "failure_details",
    "failure_message",
    "format_ms",
    "label_of",
    "machine",
    "render_details",
    "render_table",
    "summarize_cell",
    "to_json",
    "verdict_word",
    "without_xdist_group",
    "write_atomic",
    "write_json",
]

# interrupted: the test began but never finished (Ctrl-C, SIGTERM, a crashed worker): never
# a pass, whatever phases had passed before.
Outcome = Literal["passed", "failed", "skipped", "interrupted"]
CellStatus = Literal["pass", "fail", "skipped", "interrupted", "not_run"]

#: ``record_property`` names the scenarios use (see the module docstring of ``scenarios/``).
RUN_DURATION_PROPERTY: Final = "run_duration_ms"
#: The node name of the Celery worker that served the scenario (fixtures/worker.py records it).
CELERY_WORKER_PROPERTY: Final = "celery_worker"

# A failure message is for a table footer and a JSON report, not a full traceback: the whole
# traceback stays in the pytest log.
_MAX_MESSAGE_LINES: Final = 20
_MAX_MESSAGE_CHARS: Final = 2000
_MAX_TABLE_REASON: Final = 32
_MAX_DETAILS_CHARS: Final = 100_000
_NOT_APPLICABLE: Final = "·"


# -- one test -------------------------------------------------------------------------------


@dataclass
class TestRecord:
    """What one test (one scenario in one cell) did, folded over its setup/call/teardown."""

    __test__ = False  # not a pytest test class, despite the name

    nodeid: str
    cell: Cell | None
    outcome: Outcome
    message: str | None = None
    """The failure message (outcome failed), the skip reason (skipped), or the xfail reason."""
    duration_s: float = 0.0
    """Wall time over every phase, as the progress line shows it."""
    call_duration_s: float | None = None
    run_durations_ms: tuple[int, ...] = ()
    """One ``run_duration_ms`` property per ingest run the scenario made."""
    celery_worker: str | None = None
    """The node name of the Celery worker process that served it (None: in process)."""
    details: str | None = None
    """A failure in full, as the terminal shows it: the traceback with the row diff, then each
    report section (the run's worker log lines, captured output, a hang's stacks)."""
    properties: tuple[tuple[str, str], ...] = ()
    """The other ``record_property`` values, as text (JUnit carries them)."""

    @property
    def name(self) -> str:
        """The test function's name without its module or parameter ids."""
        return self.nodeid.rsplit("::", 1)[-1].split("[", 1)[0]

    def to_json(self) -> dict[str, Any]:
        mode, pool, broker = self.cell or (None, None, None)
        return {
            "test": self.nodeid,
            "loop_mode": mode,
            "pool": pool,
            "broker": broker,
            "outcome": self.outcome,
            "message": self.message,
            "duration_s": round(self.duration_s, 4),
            "run_durations_ms": list(self.run_durations_ms),
            "celery_worker": self.celery_worker,
            "details": self.details,
            "properties": dict(self.properties),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TestRecord:
        """The inverse of :meth:`to_json` (``harness report merge`` reads shards with it)."""
        mode, pool, broker = data.get("loop_mode"), data.get("pool"), data.get("broker")
        cell = Cell(str(mode), str(pool), str(broker)) if mode is not None else None
        outcome = data.get("outcome")
        if outcome not in ("passed", "failed", "skipped", "interrupted"):
            raise ValueError(f"test {data.get('test')!r}: unknown outcome {outcome!r}")
        properties = data.get("properties") or {}
        return cls(
            nodeid=str(data["test"]),
            cell=cell,
            outcome=outcome,
            message=data.get("message"),
            duration_s=float(data.get("duration_s") or 0.0),
            run_durations_ms=tuple(int(ms) for ms in data.get("run_durations_ms") or ()),
            celery_worker=data.get("celery_worker"),
            details=data.get("details"),
            properties=tuple((str(k), str(v)) for k, v in dict(properties).items()),
        )


def _label(cell: Cell | None) -> str:
    return "-" if cell is None else cell.label


def label_of(item: Mapping[str, Any]) -> str:
    """The cell label of a JSON entry with ``loop_mode``/``pool``/``broker`` (``-``: none)."""
    mode = item.get("loop_mode")
    return "-" if mode is None else Cell(mode, item["pool"], item["broker"]).label


def without_xdist_group(nodeid: str) -> str:
    """``nodeid`` without the ``@group`` that ``--dist loadgroup`` appends to a grouped test's."""
    at = nodeid.rfind("@")
    # As xdist splits it: an "@" inside the parameter id is not a group.
    return nodeid[:at] if at > nodeid.rfind("]") and at > nodeid.rfind("::") else nodeid


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr: object = report.longrepr
    # A skip's longrepr is (path, lineno, "Skipped: reason"); a deserialized (xdist) one may be
    # a list. Anything else is shown as pytest would.
    if isinstance(longrepr, tuple | list) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = report.longreprtext
    return reason.removeprefix("Skipped: ").strip() or "skipped"


def _bounded(lines: Sequence[str]) -> str:
    kept = list(lines[:_MAX_MESSAGE_LINES])
    if len(lines) > _MAX_MESSAGE_LINES:
        kept.append(f"... ({len(lines) - _MAX_MESSAGE_LINES} more lines in the pytest log)")
    text = "\n".join(kept).strip()
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text


def failure_details(report: pytest.TestReport) -> str:
    """The whole failure as pytest's terminal shows it: the traceback (its ``E`` lines hold the
    row diff), then every section of the report (worker log lines, captured output, stacks).

    Bounded, head and tail kept: a report must stay small enough for a CI system to show."""
    parts = [report.longreprtext.rstrip()]
    parts.extend(f"----- {title} -----\n{text.rstrip()}" for title, text in report.sections)
    text = "\n\n".join(part for part in parts if part)
    if len(text) <= _MAX_DETAILS_CHARS:
        return text
    head, tail = text[: _MAX_DETAILS_CHARS * 3 // 4], text[-_MAX_DETAILS_CHARS // 4 :]
    cut = len(text) - len(head) - len(tail)
    return f"{head}\n... ({cut} characters cut; all of it is in the pytest log) ...\n{tail}"


def failure_message(report: pytest.TestReport) -> str:
    """The readable part of a failure, bounded: pytest's ``E`` lines, else the crash line.

    The head of ``longreprtext`` is the test's source, so it is the last resort: the ``E``
    lines hold the exception and any assertion diff (what ``assert_run_succeeded`` explains).
    """
    text = report.longreprtext
    e_lines = [line[1:] for line in text.splitlines() if line.startswith("E ") or line == "E"]
    if e_lines:
        message = _bounded(textwrap.dedent("\n".join(e_lines)).splitlines())
    else:
        crash = getattr(report.longrepr, "reprcrash", None)
        crash_message = getattr(crash, "message", None)
        if isinstance(crash_message, str) and crash_message.strip():
            message = _bounded(crash_message.strip().splitlines())
        else:
            message = _bounded(text.strip().splitlines()) or "failed (no message)"
    if report.when in ("setup", "teardown"):
        message = f"error in {report.when}: {message}"
    return message


@dataclass
class _Pending:
    """The phases of one test seen so far (reports arrive setup, call, teardown)."""

    failed: str | None = None
    details: str | None = None
    skipped: str | None = None
    xfail: str | None = None
    duration_s: float = 0.0
    call_duration_s: float | None = None
    properties: list[tuple[str, object]] = field(default_factory=list)
    # Which phases reported: a test passed only if its call and its teardown both did.
    phases: set[str] = field(default_factory=set)


def _properties(report: pytest.TestReport) -> list[tuple[str, object]]:
    # Each phase's report carries every property recorded so far; xdist turns tuples into lists.
    result: list[tuple[str, object]] = []
    for prop in report.user_properties:
        if isinstance(prop, tuple | list) and len(prop) == 2:
            result.append((str(prop[0]), prop[1]))
    return result


def _record_from(nodeid: str, pending: _Pending) -> TestRecord:
    cell: Cell | None = None
    durations: list[int] = []
    celery_worker: str | None = None
    others: dict[str, str] = {}
    for name, value in pending.properties:
        if name == CELL_PROPERTY:
            cell = Cell.from_property(value) or cell
        elif name == RUN_DURATION_PROPERTY and isinstance(value, int | float):
            durations.append(round(value))
        elif name == CELERY_WORKER_PROPERTY and isinstance(value, str):
            celery_worker = value
        else:
            others[name] = str(value)
    outcome: Outcome
    message: str | None
    if pending.failed is not None:
        outcome, message = "failed", pending.failed
    elif pending.skipped is not None:
        outcome, message = "skipped", pending.skipped
    elif not {"call", "teardown"} <= pending.phases:
        missing = "its call" if "call" not in pending.phases else "its teardown"
        outcome, message = "interrupted", f"interrupted: {missing} never reported"
    else:
        # An xfailed scenario did what it declared (xfail_strict turns an xpass into a failure).
        outcome, message = "passed", pending.xfail
    return TestRecord(
        nodeid=nodeid,
        cell=cell or Cell.from_nodeid(nodeid),
        outcome=outcome,
        message=message,
        duration_s=pending.duration_s,
        call_duration_s=pending.call_duration_s,
        run_durations_ms=tuple(durations),
        celery_worker=celery_worker,
        details=pending.details if outcome == "failed" else None,
        properties=tuple(others.items()),
    )


# -- the pytest plugin ----------------------------------------------------------------------


class MatrixCollector:
    """A pytest plugin object: records every test's outcome and prints a progress line each.

    Register it in the process that runs ``pytest.main`` (the xdist controller with ``-n``);
    workers never see it, which is fine because the controller receives every report.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.records: list[TestRecord] = []
        self.collection_errors: list[str] = []
        self.total: int | None = None
        self._pending: dict[str, _Pending] = {}
        self._mode_width = max(len(m) for m in MATRIX_MODES)
        self._pool_width = max(len(p) for p in POOLS) + 1 + max(len(b) for b in BROKERS)

    # Without xdist this runs after -k/-m deselection, so the count is what will run (unlike
    # pytest_collection_modifyitems, whose order relative to the deselecting hook is not ours).
    @pytest.hookimpl
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.total = len(session.items)

    # The xdist controller never collects; each worker reports its (identical) collection.
    # optionalhook: pytest must accept this plugin when xdist is not installed or not active.
    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: object, ids: Sequence[str]) -> None:
        self.total = max(self.total or 0, len(ids))

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            where = report.nodeid or "collection"
            self.collection_errors.append(f"{where}: {_bounded(report.longreprtext.splitlines())}")

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        nodeid = without_xdist_group(report.nodeid)
        pending = self._pending.setdefault(nodeid, _Pending())
        props = _properties(report)
        if len(props) >= len(pending.properties):
            pending.properties = props
        pending.duration_s += report.duration
        pending.phases.add(report.when)
        if report.when == "call":
            pending.call_duration_s = report.duration
        if report.failed and pending.failed is None:
            pending.failed = failure_message(report)
            pending.details = failure_details(report)
        elif report.skipped:
            if hasattr(report, "wasxfail"):
                pending.xfail = f"xfail: {report.wasxfail}" if report.wasxfail else "xfail"
            elif pending.skipped is None:
                pending.skipped = _skip_reason(report)
        # A test ends with its teardown report; a crashed xdist worker's item gets one report
        # with when="???" and nothing after it.
        if report.when not in ("setup", "call"):
            self._finish(nodeid)

    def _finish(self, nodeid: str) -> None:
        pending = self._pending.pop(nodeid, None)
        if pending is None:
            return
        record = _record_from(nodeid, pending)
        self.records.append(record)
        self._progress(record)

    def _progress(self, record: TestRecord) -> None:
        if self.stream is None:
            return
        done = len(self.records)
        if self.total:
            width = len(str(self.total))
            counter = f"[{done:>{width}}/{self.total}]"
        else:
            counter = f"[{done:>3}]"
        mode, pool, broker = record.cell or ("?", "?", "?")
        where = "" if pool == "-" else f"{pool}/{broker}"
        label = {
            "passed": "PASS",
            "failed": "FAIL",
            "skipped": "SKIP",
            "interrupted": "INTERRUPTED",
        }[record.outcome]
        if record.outcome == "passed" and record.message:
            label = "XFAIL"
        line = (
            f"{counter} {mode:<{self._mode_width}}  {where:<{self._pool_width}}  "
            f"{record.name}  {label}  {record.duration_s:.2f}s"
        )
        self.stream.write(line + "\n")
        self.stream.flush()

    def flush_pending(self) -> None:
        """Record tests whose teardown never arrived (an interrupted session) as they stand."""
        for nodeid in list(self._pending):
            self._finish(nodeid)


# -- aggregation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CellSummary:
    """One matrix cell: its status and what it is made of."""

    loop_mode: str
    pool: str
    broker: str
    status: CellStatus
    scenarios: int
    passed: int
    failed: int
    skipped: int
    median_run_ms: float | None
    failures: tuple[tuple[str, str], ...]
    """(test node id, message) per failed test."""
    skip_reason: str | None

    @property
    def cell(self) -> Cell:
        return Cell(self.loop_mode, self.pool, self.broker)

    def to_json(self) -> dict[str, Any]:
        return {
            "loop_mode": self.loop_mode,
            "pool": self.pool,
            "broker": self.broker,
            "status": self.status,
            "scenarios": self.scenarios,
            "passed": self.passed,
            "failed": self.failed,
            "skipped": self.skipped,
            "median_run_ms": self.median_run_ms,
            "failures": [{"test": test, "message": message} for test, message in self.failures],
            "skip_reason": self.skip_reason,
        }


def summarize_cell(cell: Cell, records: Sequence[TestRecord]) -> CellSummary:
    """Status: fail if any test failed, skipped if all skipped, pass if all ran and passed.

    A cell nothing ran in is ``not_run``: it did not pass, whatever the reason (a -k that
    matched none of its scenarios, a collection error).
    """
    passed = sum(r.outcome == "passed" for r in records)
    failed = [r for r in records if r.outcome == "failed"]
    skipped = [r for r in records if r.outcome == "skipped"]
    status: CellStatus
    if not records:
        status = "not_run"
    elif failed:
        status = "fail"
    elif any(r.outcome == "interrupted" for r in records):
        status = "interrupted"
    elif len(skipped) == len(records):
        status = "skipped"
    else:
        status = "pass"
    runs = [ms for r in records for ms in r.run_durations_ms]
    if not runs:
        # Scenarios that record no run durations: the test body's time is the next best thing.
        runs = [
            round(r.call_duration_s * 1000)
            for r in records
            if r.call_duration_s is not None and r.outcome != "skipped"
        ]
    reasons = list(dict.fromkeys(r.message or "skipped" for r in skipped))
    return CellSummary(
        loop_mode=cell[0],
        pool=cell[1],
        broker=cell[2],
        status=status,
        scenarios=len(records),
        passed=passed,
        failed=len(failed),
        skipped=len(skipped),
        median_run_ms=float(statistics.median(runs)) if runs else None,
        failures=tuple((r.nodeid, r.message or "failed") for r in failed),
        skip_reason="; ".join(reasons) if reasons else None,
    )


# Exit codes of the `harness` commands (pytest's own codes are kept in the report).
EXIT_OK: Final = 0
EXIT_NOT_PASSED: Final = 1
EXIT_ERROR: Final = 2


def verdict_word(exit_code: int) -> str:
    """``PASS`` (0), ``ERROR`` (2: it could not run properly), else ``FAIL``."""
    return {EXIT_OK: "PASS", EXIT_ERROR: "ERROR"}.get(exit_code, "FAIL")


@dataclass
class MatrixResult:
    """Every test record of one matrix run against the cells that were selected."""

    loop_modes: tuple[str, ...]
    pools: tuple[str, ...]
    brokers: tuple[str, ...]
    services: str
    records: list[TestRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Problems outside any test: collection errors, pytest usage errors, no tests collected."""
    pytest_exit_code: int | None = None
    # The backend that served the session and the images that ran (harness.matrix.cli.served_by);
    # None when the services were not started by the report's writer (--no-services).
    served_by: Mapping[str, Any] | None = None
    # Python, Celery, kombu, SQLAlchemy, Postgres, Redis (harness.matrix.cli.versions).
    versions: Mapping[str, str | None] = field(default_factory=dict)
    # The machine the run was on (machine()), and the run's wall time, exit to exit.
    machine: Mapping[str, Any] = field(default_factory=dict)
    wall_s: float | None = None
    # --shard K/N: this run is that shard, and its selected cells are the shard's part.
    shard: Shard | None = None
    # A merged report: one entry per shard read (harness.matrix.merge).
    shards: list[Mapping[str, Any]] = field(default_factory=list)

    @classmethod
    def from_config(
        cls,
        config: HarnessConfig,
        records: Iterable[TestRecord] = (),
        *,
        errors: Iterable[str] = (),
        pytest_exit_code: int | None = None,
        served_by: Mapping[str, Any] | None = None,
        versions: Mapping[str, str | None] | None = None,
        wall_s: float | None = None,
    ) -> MatrixResult:
        return cls(
            loop_modes=config.loop_modes,
            pools=config.pools,
            brokers=config.brokers,
            services=config.services,
            records=list(records),
            errors=list(errors),
            pytest_exit_code=pytest_exit_code,
            served_by=served_by,
            versions=dict(versions or {}),
            machine=machine(),
            wall_s=wall_s,
            shard=config.shard,
        )

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> MatrixResult:
        """A report read back (``reports/matrix.json``); ValueError if it is not one."""
        try:
            selected = document["selected"]
            shard = document.get("shard")
            return cls(
                loop_modes=tuple(selected["loop_modes"]),
                pools=tuple(selected["pools"]),
                brokers=tuple(selected["brokers"]),
                services=str(selected["services"]),
                records=[TestRecord.from_json(test) for test in document["tests"]],
                errors=[str(error) for error in document.get("errors", [])],
                pytest_exit_code=document.get("pytest_exit_code"),
                served_by=document.get("served_by"),
                versions=dict(document.get("versions") or {}),
                machine=dict(document.get("machine") or {}),
                wall_s=document.get("wall_s"),
                shard=None if shard is None else Shard(int(shard["index"]), int(shard["total"])),
                shards=list(document.get("shards") or []),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a harness matrix report: {exc!r} is missing or wrong") from None

    def selected_cells(self) -> list[Cell]:
        """The cells in HarnessConfig.cells() order (the order the plugin parametrizes in)."""
        return HarnessConfig(
            loop_modes=self.loop_modes,
            pools=self.pools,
            brokers=self.brokers,
            env={},
            shard=self.shard,
        ).cells()

    def cells(self) -> list[CellSummary]:
        by_cell: dict[Cell, list[TestRecord]] = {cell: [] for cell in self.selected_cells()}
        for record in self.records:
            if record.cell in by_cell:
                by_cell[record.cell].append(record)
        return [summarize_cell(cell, records) for cell, records in by_cell.items()]

    def unassigned(self) -> list[TestRecord]:
        """Tests whose cell is unknown or not selected (they still count when they fail)."""
        selected = set(self.selected_cells())
        return [r for r in self.records if r.cell not in selected]

    @property
    def exit_code(self) -> int:
        """0 only when every selected cell passed; 2 when the matrix could not run properly."""
        if self.errors or self.pytest_exit_code not in (None, 0, 1) or not self.records:
            return EXIT_ERROR
        if any(r.outcome == "failed" for r in self.unassigned()):
            return EXIT_NOT_PASSED
        if self.pytest_exit_code == 1 and all(r.outcome != "failed" for r in self.records):
            # pytest failed without a failed test (e.g. a plugin's sessionfinish): not a pass.
            return EXIT_NOT_PASSED
        if all(cell.status == "pass" for cell in self.cells()):
            return EXIT_OK
        return EXIT_NOT_PASSED


# -- rendering ------------------------------------------------------------------------------


def format_ms(ms: float | None) -> str:
    """``85ms``, ``1.24s``, or ``-`` when there is no duration."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f}ms"
    return f"{ms / 1000:.2f}s"


def _cell_text(summary: CellSummary) -> str:
    median = format_ms(summary.median_run_ms)
    if summary.status == "pass":
        return f"pass {summary.scenarios} {median}"
    if summary.status == "fail":
        return f"FAIL {summary.failed}/{summary.scenarios} {median}"
    if summary.status == "skipped":
        reason = summary.skip_reason or "skipped"
        if len(reason) > _MAX_TABLE_REASON:
            reason = reason[: _MAX_TABLE_REASON - 3] + "..."
        return f"skipped {summary.scenarios}: {reason}"
    if summary.status == "interrupted":
        return f"INTERRUPTED {summary.passed}/{summary.scenarios}"
    return "NOT RUN"


def render_table(result: MatrixResult) -> str:
    """The matrix as aligned plain text: a row per loop mode, a column per pool x broker.

    ``in_process`` has no worker, so its one cell sits in the first column and the rest
    show ``·``; so does a pool that a mode does not apply to (``inherited_loop`` off prefork).
    """
    columns = [(pool, broker) for broker in result.brokers for pool in result.pools]
    summaries = {s.cell: s for s in result.cells()}
    header = ["loop mode", *(f"{pool}/{broker}" for pool, broker in columns)]
    rows: list[list[str]] = []
    for mode in result.loop_modes:
        if mode == "in_process":
            # Absent from a shard's report whose part it is not.
            summary = summaries.get(Cell(mode))
            first = _NOT_APPLICABLE if summary is None else _cell_text(summary)
            rows.append([mode, first, *([_NOT_APPLICABLE] * (len(columns) - 1))])
        else:
            rows.append(
                [
                    mode,
                    *(
                        _cell_text(summaries[Cell(mode, p, b)])
                        if Cell(mode, p, b) in summaries
                        else _NOT_APPLICABLE
                        for p, b in columns
                    ),
                ]
            )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(text.ljust(widths[i]) for i, text in enumerate(cells)).rstrip()

    lines = [line(header), line(["-" * w for w in widths])]
    lines.extend(line(row) for row in rows)
    lines.append("")
    lines.append("cell: status, scenario count, median run duration")
    if result.served_by is not None:
        lines.append(served_by_text(result.served_by))
    return "\n".join(lines)


def served_by_text(served: Mapping[str, Any]) -> str:
    """``services: docker; postgres 15.18 (image ...); redis 7.0.15 (image ...)``."""
    images = served.get("images") or {}
    parts = [f"services: {served.get('backend')}"]
    for name in ("postgres", "redis"):
        image = images.get(name)
        parts.append(f"{name} {served.get(name)}" + (f" (image {image})" if image else ""))
    if images.get("rabbitmq"):
        parts.append(f"rabbitmq (image {images['rabbitmq']})")
    return "; ".join(parts)


def render_details(result: MatrixResult) -> str:
    """Everything that did not pass, in full: errors, failures (with messages), skip reasons."""
    out: list[str] = []
    if result.errors:
        out.append("Errors:")
        for error in result.errors:
            first, _, rest = error.partition("\n")
            out.append(f"  - {first}")
            if rest:
                out.append(textwrap.indent(rest, "    "))
    cells = result.cells()
    failed = [(s.cell.label, test, msg) for s in cells for test, msg in s.failures]
    failed.extend(
        (_label(r.cell), r.nodeid, r.message or "failed")
        for r in result.unassigned()
        if r.outcome == "failed"
    )
    if failed:
        out.append("Failures:")
        for label, test, message in failed:
            out.append(f"  {label}  {test}")
            out.append(textwrap.indent(message, "      "))
    skipped = [s for s in cells if s.skip_reason]
    if skipped:
        out.append("Skipped:")
        out.extend(f"  {s.cell.label}  {s.skipped}/{s.scenarios}: {s.skip_reason}" for s in skipped)
    not_run = [s.cell.label for s in cells if s.status == "not_run"]
    if not_run and len(not_run) == len(cells):
        out.append("Not run: no scenario ran in any cell")
    elif not_run:
        out.append("Not run (no scenario ran in these cells): " + ", ".join(not_run))
    return "\n".join(out)


# -- JSON -----------------------------------------------------------------------------------


def to_json(result: MatrixResult) -> dict[str, Any]:
    """The ``reports/matrix.json`` document (see the CLI's help for the schema)."""
    versions = result.versions
    return {
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "selected": {
            "loop_modes": list(result.loop_modes),
            "pools": list(result.pools),
            "brokers": list(result.brokers),
            "services": result.services,
        },
        "versions": {key: versions.get(key) for key in VERSION_KEYS},
        "machine": dict(result.machine),
        "wall_s": None if result.wall_s is None else round(result.wall_s, 2),
        "shard": None
        if result.shard is None
        else {
            "index": result.shard.index,
            "total": result.shard.total,
            "cells": [cell.label for cell in result.selected_cells()],
        },
        "shards": list(result.shards),
        "served_by": None if result.served_by is None else dict(result.served_by),
        "cells": [summary.to_json() for summary in result.cells()],
        "errors": list(result.errors),
        "tests": [record.to_json() for record in result.records],
        "pytest_exit_code": result.pytest_exit_code,
        "exit_code": result.exit_code,
    }


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    write_atomic(path, json.dumps(document, indent=2, sort_keys=False) + "\n")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a report atomically, so a reader (CI, a flake loop) never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    tmp.replace(path)
