"""Unit tests of harness.report: folding phase reports, per-cell aggregation, table and JSON.

The reports are built by hand (the same `pytest.TestReport` class xdist deserializes into), so
no pytest session is run here.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness.core.cell import Cell
from harness.core.config import HarnessConfig
from harness.matrix.report import (
    EXIT_ERROR,
    EXIT_NOT_PASSED,
    EXIT_OK,
    MatrixCollector,
    MatrixResult,
    TestRecord,
    _cell_text,
    format_ms,
    render_details,
    render_table,
    summarize_cell,
    to_json,
    without_xdist_group,
    write_json,
)

PASS_CELL = ("running_loop", "prefork", "redis")
FAIL_TEXT = """\
    def test_x():
>       assert_run_succeeded(run)
E       AssertionError: run 7 ended 'failed'
E         - succeeded
E         + failed

scenarios/test_x.py:3: AssertionError"""


def report(
    nodeid: str,
    when: str,
    outcome: str = "passed",
    *,
    props: Iterable[tuple[str, object]] = (),
    longrepr: Any = None,
    duration: float = 0.01,
    **extra: Any,
) -> pytest.TestReport:
    rep = pytest.TestReport(
        nodeid=nodeid,
        location=(nodeid.split("::")[0], 0, nodeid),
        keywords={},
        outcome=outcome,  # type: ignore[arg-type]
        longrepr=longrepr,
        when=when,  # type: ignore[arg-type]
        duration=duration,
        user_properties=list(props),
    )
    for name, value in extra.items():
        setattr(rep, name, value)
    return rep


def feed(collector: MatrixCollector, *reports: pytest.TestReport) -> None:
    for rep in reports:
        collector.pytest_runtest_logreport(rep)


def phases(
    nodeid: str,
    *,
    call: str = "passed",
    props: Iterable[tuple[str, object]] = (),
    longrepr: Any = None,
) -> list[pytest.TestReport]:
    props = list(props)
    return [
        report(nodeid, "setup"),
        report(nodeid, "call", call, props=props, longrepr=longrepr, duration=0.05),
        report(nodeid, "teardown", props=props),
    ]


def cell_prop(cell: tuple[str, str, str]) -> tuple[str, object]:
    return ("matrix_cell", "|".join(cell))


# -- collector ------------------------------------------------------------------------------


def test_passed_test_records_cell_durations_and_prints_progress() -> None:
    out = io.StringIO()
    collector = MatrixCollector(stream=out)
    collector.pytest_collection_finish(SimpleNamespace(items=[1] * 48))  # type: ignore[arg-type]
    nodeid = "scenarios/test_a.py::test_success[running_loop-prefork-redis]"
    props = [
        cell_prop(PASS_CELL),
        ("celery_worker", "harness-gw0-1a2b3c4d"),
        ("run_duration_ms", 80),
        ("run_duration_ms", 90),
    ]
    # As pytest-xdist's loadgroup names a grouped test on pytest < 9.2.
    feed(collector, *phases(f"{nodeid}@harness-worker-prefork-redis", props=props))

    (record,) = collector.records
    assert record.nodeid == nodeid
    assert record.cell == PASS_CELL
    assert record.outcome == "passed"
    assert record.celery_worker == "harness-gw0-1a2b3c4d"
    assert record.to_json()["celery_worker"] == "harness-gw0-1a2b3c4d"
    # Each phase carries every property so far: the durations are not counted twice.
    assert record.run_durations_ms == (80, 90)
    assert record.duration_s == pytest.approx(0.07)
    assert record.call_duration_s == pytest.approx(0.05)
    line = out.getvalue().rstrip("\n")
    assert line.startswith("[ 1/48] running_loop")
    assert "prefork/redis" in line
    assert line.endswith("test_success  PASS  0.07s")


def test_failed_call_keeps_the_E_lines_as_message() -> None:
    collector = MatrixCollector()
    nodeid = "scenarios/test_a.py::test_x[no_loop-solo-redis]"
    feed(collector, *phases(nodeid, call="failed", longrepr=FAIL_TEXT))
    (record,) = collector.records
    assert record.outcome == "failed"
    assert record.message == "AssertionError: run 7 ended 'failed'\n  - succeeded\n  + failed"
    # No property recorded: the cell comes from the parameter id.
    assert record.cell == ("no_loop", "solo", "redis")


def test_failure_message_falls_back_to_the_crash_line() -> None:
    try:
        raise RuntimeError("worker never answered ping")
    except RuntimeError as exc:
        info = pytest.ExceptionInfo.from_exception(exc)
    repr_ = info.getrepr(style="native")  # native tracebacks have no E lines
    collector = MatrixCollector()
    feed(collector, *phases("t.py::t[in_process]", call="failed", longrepr=repr_))
    (record,) = collector.records
    assert record.message is not None
    assert "RuntimeError: worker never answered ping" in record.message


def test_failure_message_is_bounded() -> None:
    text = "\n".join(f"E   line {i}" for i in range(200))
    collector = MatrixCollector()
    feed(collector, *phases("t.py::t[in_process]", call="failed", longrepr=text))
    message = collector.records[0].message
    assert message is not None
    assert len(message.splitlines()) == 21
    assert message.endswith("(180 more lines in the pytest log)")


def test_setup_skip_gives_the_reason_and_is_not_a_pass() -> None:
    collector = MatrixCollector()
    nodeid = "t.py::t[running_uvloop-threads-redis]"
    feed(
        collector,
        report(nodeid, "setup", "skipped", longrepr=("t.py", 3, "Skipped: uvloop not installed")),
        report(nodeid, "teardown"),
    )
    (record,) = collector.records
    assert (record.outcome, record.message) == ("skipped", "uvloop not installed")


def test_deserialized_skip_longrepr_is_a_list() -> None:
    collector = MatrixCollector()
    feed(
        collector,
        report("t.py::t[in_process]", "setup", "skipped", longrepr=["t.py", 3, "Skipped: why"]),
        report("t.py::t[in_process]", "teardown"),
    )
    assert collector.records[0].message == "why"


def test_teardown_error_after_a_pass_is_a_failure() -> None:
    collector = MatrixCollector()
    nodeid = "t.py::t[in_process]"
    feed(
        collector,
        report(nodeid, "setup"),
        report(nodeid, "call"),
        report(nodeid, "teardown", "failed", longrepr="E   RuntimeError: worker did not stop"),
    )
    (record,) = collector.records
    assert record.outcome == "failed"
    assert record.message == "error in teardown: RuntimeError: worker did not stop"


def test_xfailed_scenario_counts_as_passed() -> None:
    collector = MatrixCollector(stream=io.StringIO())
    nodeid = "t.py::t[running_loop-solo-redis]"
    feed(
        collector,
        report(nodeid, "setup"),
        report(nodeid, "call", "skipped", longrepr=("t.py", 1, "x"), wasxfail="pre-fix runner"),
        report(nodeid, "teardown"),
    )
    (record,) = collector.records
    assert (record.outcome, record.message) == ("passed", "xfail: pre-fix runner")


def test_crashed_xdist_worker_item_is_recorded_as_failed() -> None:
    collector = MatrixCollector()
    nodeid = "t.py::t[no_loop-prefork-redis]"
    feed(collector, report(nodeid, "???", "failed", longrepr="worker 'gw0' crashed while running"))
    (record,) = collector.records
    assert record.outcome == "failed"
    assert "crashed" in (record.message or "")


def test_flush_pending_records_interrupted_tests_as_interrupted_never_passed() -> None:
    out = io.StringIO()
    collector = MatrixCollector(stream=out)
    # Ctrl-C during the call: only its setup reported. And one interrupted during teardown.
    feed(collector, report("t.py::t[in_process]", "setup"))
    feed(collector, report("t.py::u[in_process]", "setup"), report("t.py::u[in_process]", "call"))
    assert collector.records == []
    collector.flush_pending()
    assert [(r.outcome, r.message) for r in collector.records] == [
        ("interrupted", "interrupted: its call never reported"),
        ("interrupted", "interrupted: its teardown never reported"),
    ]
    assert "INTERRUPTED" in out.getvalue() and "PASS" not in out.getvalue()
    cell = summarize_cell(("in_process", "-", "-"), collector.records)
    assert (cell.status, cell.passed) == ("interrupted", 0)
    assert _cell_text(cell) == "INTERRUPTED 0/2"


def test_total_from_xdist_and_unknown_total() -> None:
    out = io.StringIO()
    collector = MatrixCollector(stream=out)
    feed(collector, *phases("t.py::t[in_process]"))
    assert out.getvalue().startswith("[  1] in_process")
    collector.pytest_xdist_node_collection_finished(node=object(), ids=["a"] * 12)
    assert collector.total == 12


def test_collection_errors_are_kept() -> None:
    collector = MatrixCollector()
    rep = pytest.CollectReport("scenarios/test_b.py", "failed", "E   ImportError: no app", [])
    collector.pytest_collectreport(rep)
    assert collector.collection_errors == ["scenarios/test_b.py: E   ImportError: no app"]


# -- cells ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodeid", "cell"),
    [
        ("t.py::t[running_loop-prefork-redis]", ("running_loop", "prefork", "redis")),
        ("t.py::t[in_process]", ("in_process", "-", "-")),
        ("t.py::t[case1-idle_loop-gevent-amqp]", ("idle_loop", "gevent", "amqp")),
        ("t.py::t[no_loop-threads-redis-case2]", ("no_loop", "threads", "redis")),
        ("t.py::t[no_loop-bogus-redis]", None),
        ("t.py::t", None),
    ],
)
def test_cell_from_nodeid(nodeid: str, cell: tuple[str, str, str] | None) -> None:
    assert Cell.from_nodeid(nodeid) == cell


def test_cell_from_property() -> None:
    assert Cell.from_property("no_loop|solo|redis") == ("no_loop", "solo", "redis")
    assert Cell.from_property("no_loop|solo") is None
    assert Cell.from_property(3) is None


def rec(
    outcome: str = "passed",
    cell: tuple[str, str, str] | None = PASS_CELL,
    *,
    runs: tuple[int, ...] = (),
    call: float | None = 0.1,
    message: str | None = None,
    nodeid: str = "t.py::t",
) -> TestRecord:
    return TestRecord(
        nodeid=nodeid,
        cell=cell,
        outcome=outcome,  # type: ignore[arg-type]
        message=message,
        call_duration_s=call,
        run_durations_ms=runs,
    )


def test_summarize_statuses() -> None:
    assert summarize_cell(PASS_CELL, [rec(), rec("skipped", message="n/a")]).status == "pass"
    failing = summarize_cell(PASS_CELL, [rec(), rec("failed", message="boom", nodeid="t.py::f")])
    assert failing.status == "fail"
    assert failing.failures == (("t.py::f", "boom"),)
    skipped = summarize_cell(PASS_CELL, [rec("skipped", message="no uvloop")] * 2)
    assert (skipped.status, skipped.skip_reason, skipped.skipped) == ("skipped", "no uvloop", 2)
    assert summarize_cell(PASS_CELL, []).status == "not_run"


def test_median_uses_run_durations_then_call_durations() -> None:
    with_runs = summarize_cell(PASS_CELL, [rec(runs=(10, 30)), rec(runs=(20,)), rec(runs=(500,))])
    assert with_runs.median_run_ms == 25.0
    without = summarize_cell(PASS_CELL, [rec(call=0.1), rec(call=0.3), rec("skipped", call=9.0)])
    assert without.median_run_ms == 200.0
    assert summarize_cell(PASS_CELL, [rec(call=None)]).median_run_ms is None


def result(*records: TestRecord, **kwargs: Any) -> MatrixResult:
    config = HarnessConfig(
        services="external",
        loop_modes=("no_loop", "running_loop", "in_process"),
        pools=("prefork", "solo"),
        brokers=("redis",),
        env={},
    )
    return MatrixResult.from_config(config, records, **kwargs)


def all_cells_passing() -> list[TestRecord]:
    cells = [
        ("no_loop", "prefork", "redis"),
        ("no_loop", "solo", "redis"),
        ("running_loop", "prefork", "redis"),
        ("running_loop", "solo", "redis"),
        ("in_process", "-", "-"),
    ]
    return [rec(cell=cell, runs=(85,)) for cell in cells]


def test_exit_code() -> None:
    passing = all_cells_passing()
    assert result(*passing, pytest_exit_code=0).exit_code == EXIT_OK
    # A skipped cell or one nothing ran in did not pass.
    skipped = [*passing[:-1], rec("skipped", cell=("in_process", "-", "-"), message="x")]
    assert result(*skipped, pytest_exit_code=0).exit_code == EXIT_NOT_PASSED
    assert result(*passing[:-1], pytest_exit_code=0).exit_code == EXIT_NOT_PASSED
    failed = [*passing, rec("failed", cell=PASS_CELL, message="boom")]
    assert result(*failed, pytest_exit_code=1).exit_code == EXIT_NOT_PASSED
    outside = [*passing, rec("failed", cell=None, message="boom")]
    assert result(*outside, pytest_exit_code=1).exit_code == EXIT_NOT_PASSED
    assert result(*passing, pytest_exit_code=1).exit_code == EXIT_NOT_PASSED
    # Never a pass: nothing collected, a collection error, an interrupted session.
    assert result(pytest_exit_code=5).exit_code == EXIT_ERROR
    assert result(*passing, errors=["collect"], pytest_exit_code=0).exit_code == EXIT_ERROR
    assert result(*passing, pytest_exit_code=2).exit_code == EXIT_ERROR


def test_render_table_rows_columns_and_in_process_row() -> None:
    records = all_cells_passing()
    records[1] = rec("failed", cell=("no_loop", "solo", "redis"), runs=(1500,), message="boom")
    records[2] = rec("skipped", cell=PASS_CELL, message="uvloop is not installed on this box")
    table = render_table(result(*records, pytest_exit_code=1))
    lines = table.splitlines()
    assert lines[0].split() == ["loop", "mode", "prefork/redis", "solo/redis"]
    assert lines[2].split() == ["no_loop", "pass", "1", "85ms", "FAIL", "1/1", "1.50s"]
    assert lines[3].startswith("running_loop  skipped 1: uvloop is not installed on th...")
    assert lines[3].endswith("pass 1 85ms")
    assert lines[4].split() == ["in_process", "pass", "1", "85ms", "·"]
    # Aligned: every column starts at the same offset on every row.
    second_column = lines[0].index("prefork/redis")
    assert all(line[second_column - 2 : second_column] == "  " for line in lines[1:5])
    assert lines[2][second_column:].startswith("pass")


def test_render_details_lists_failures_skips_errors_and_not_run() -> None:
    records = all_cells_passing()[:-1]
    records[0] = rec("failed", cell=records[0].cell, nodeid="t.py::a", message="boom\nsecond")
    records[1] = rec("skipped", cell=records[1].cell, message="no gevent")
    details = render_details(result(*records, errors=["t.py: ImportError\ntrace"]))
    assert "Errors:\n  - t.py: ImportError\n    trace" in details
    assert "Failures:\n  no_loop/prefork/redis  t.py::a\n      boom\n      second" in details
    assert "Skipped:\n  no_loop/solo/redis  1/1: no gevent" in details
    assert details.endswith("Not run (no scenario ran in these cells): in_process")


def test_to_json_schema(tmp_path: Path) -> None:
    records = all_cells_passing()
    records[0] = rec("failed", cell=records[0].cell, nodeid="t.py::a", message="boom", runs=(9,))
    versions = {
        "python": "3.11",
        "celery": "5",
        "kombu": "5",
        "sqlalchemy": "2",
        "postgres": "15.2",
        "redis": "7.0",
        "ignored": "x",
    }
    document = to_json(result(*records, pytest_exit_code=1, versions=versions, wall_s=1.234))
    assert set(document) == {
        "generated_at",
        "selected",
        "versions",
        "machine",
        "wall_s",
        "shard",
        "shards",
        "served_by",
        "cells",
        "errors",
        "tests",
        "pytest_exit_code",
        "exit_code",
    }
    assert document["served_by"] is None  # the writer started no services
    assert document["selected"] == {
        "loop_modes": ["no_loop", "running_loop", "in_process"],
        "pools": ["prefork", "solo"],
        "brokers": ["redis"],
        "services": "external",
    }
    # worker_python was not given: None, not missing.
    assert document["versions"] == {
        "worker_python": None,
        **{k: v for k, v in versions.items() if k != "ignored"},
    }
    assert document["wall_s"] == 1.23 and document["shard"] is None
    assert document["machine"]["cpus"] == os.cpu_count()
    assert document["exit_code"] == EXIT_NOT_PASSED
    cells = document["cells"]
    assert [(c["loop_mode"], c["pool"], c["broker"]) for c in cells] == [
        ("no_loop", "prefork", "redis"),
        ("no_loop", "solo", "redis"),
        ("running_loop", "prefork", "redis"),
        ("running_loop", "solo", "redis"),
        ("in_process", "-", "-"),
    ]
    assert cells[0] == {
        "loop_mode": "no_loop",
        "pool": "prefork",
        "broker": "redis",
        "status": "fail",
        "scenarios": 1,
        "passed": 0,
        "failed": 1,
        "skipped": 0,
        "median_run_ms": 9.0,
        "failures": [{"test": "t.py::a", "message": "boom"}],
        "skip_reason": None,
    }
    assert document["tests"][0]["outcome"] == "failed"
    path = tmp_path / "deep" / "matrix.json"
    write_json(path, document)
    assert json.loads(path.read_text()) == document
    assert [p.name for p in path.parent.iterdir()] == ["matrix.json"]
    # Read back (harness report merge does), it is the same report.
    again = MatrixResult.from_json(json.loads(path.read_text()))
    assert [c.to_json() for c in again.cells()] == document["cells"]
    assert [r.to_json() for r in again.records] == document["tests"]
    assert again.exit_code == EXIT_NOT_PASSED and again.versions == document["versions"]


def test_a_file_that_is_no_report_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a harness matrix report"):
        MatrixResult.from_json({"cells": []})
    with pytest.raises(ValueError, match="unknown outcome 'weird'"):
        TestRecord.from_json({"test": "t.py::a", "outcome": "weird"})


@pytest.mark.parametrize(("ms", "text"), [(None, "-"), (85.4, "85ms"), (1234.0, "1.23s")])
def test_format_ms(ms: float | None, text: str) -> None:
    assert format_ms(ms) == text


@pytest.mark.parametrize(
    ("nodeid", "expected"),
    [
        (
            "sc/t.py::test_a[no_loop-solo-redis]@harness-worker-solo-redis",
            "sc/t.py::test_a[no_loop-solo-redis]",
        ),
        ("sc/t.py::test_a[no_loop-solo-redis]", "sc/t.py::test_a[no_loop-solo-redis]"),
        ("sc/t.py::test_a[user@host]", "sc/t.py::test_a[user@host]"),
        ("sc/t.py::test_b@group", "sc/t.py::test_b"),
    ],
)
def test_without_xdist_group(nodeid: str, expected: str) -> None:
    assert without_xdist_group(nodeid) == expected
