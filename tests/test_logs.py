"""harness.core.logs on lines as the worker writes them (the runbook's example and a real worker
log)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from harness.core.logs import (
    COMPLETED_TEMPLATE,
    FAILED_TEMPLATE,
    FORBIDDEN_TEXT,
    IDLE_CHECK_FAILED_TEMPLATE,
    IDLE_CHECK_OK_TEMPLATE,
    IDLE_CHECK_RE,
    JOB_FAULT_TEMPLATE,
    LOOP_MODE_TEMPLATE,
    RUNNER_LOGGER,
    RUNNER_TEMPLATE,
    SHARED_LOOP_TEMPLATE,
    STARTING_TEMPLATE,
    STRATEGY_ASYNCIO_RUN,
    STRATEGY_THREAD_POOL,
    TASK_LOGGER,
    LogLine,
    find_forbidden,
    harness_lines,
    parse_log,
    parse_runner_line,
    promised_end,
    read_log_file,
    runner_lines,
    task_lines,
    trace_lines,
    tracebacks,
)

# The runbook's "Пример успешного выполнения", verbatim.
RUNBOOK_EXAMPLE = """\
[2026-01-27 10:00:00] INFO app.tasks.ingest.execute_ingest: Starting run 123
[2026-01-27 10:00:00] INFO app.utils.asyncio_runner: run_async_safe: detected_running_loop=False, using asyncio.run() (context: {'run_id': 123, 'job_code': 'frontend_prices'})
[2026-01-27 10:05:00] INFO app.tasks.ingest.execute_ingest: Run 123 completed successfully
"""  # noqa: E501

# Copied from a harness worker's log (solo pool), with a run 12 added next to run 123.
WORKER_LOG = """\
/work/main/.venv/lib/python3.11/site-packages/celery/platforms.py:893: SecurityWarning: You're running the worker with superuser privileges: this is
absolutely not recommended!
 -------------- harness-main-1b8a91a9@vm v5.7.0 (collider)
[2026-11-28 14:57:32] INFO celery.worker.consumer.connection: Connected to redis://:**@127.0.0.1:6379/14
[2026-11-28 14:57:32] INFO celery.apps.worker: harness-main-1b8a91a9@vm ready.
[2026-11-28 14:57:33] INFO celery.worker.strategy: Task app.tasks.ingest.execute_ingest[ba8ea007-29a1-40be-b5a6-2c1d430ef357] received
[2026-11-28 14:57:33] INFO harness.loopmodes: loop mode for run 123: running_loop (from header harness_loop_mode)
[2026-11-28 14:57:33] INFO app.tasks.ingest.execute_ingest: Starting run 123
[2026-11-28 14:57:33] INFO app.utils.asyncio_runner: run_async_safe: detected_running_loop=True, using thread pool (context: {'run_id': 123, 'job_code': 'nojob'})
[2026-11-28 14:57:33] ERROR app.tasks.ingest.execute_ingest: Run 123 failed: UnknownJobError: unknown job_code 'nojob'; known job codes: frontend_prices, stocks
[2026-11-28 14:57:33] INFO celery.app.trace: Task app.tasks.ingest.execute_ingest[ba8ea007-29a1-40be-b5a6-2c1d430ef357] succeeded in 0.004285621999997602s: {'run_id': 123, 'status': 'failed'}
[2026-11-28 14:57:34] INFO harness.loopmodes: loop mode for run 12: idle_loop (from HARNESS_DEFAULT_LOOP_MODE)
[2026-11-28 14:57:34] INFO app.tasks.ingest.execute_ingest: Starting run 12
[2026-11-28 14:57:34] INFO app.utils.asyncio_runner: run_async_safe: detected_running_loop=False, using asyncio.run() (context: {'run_id': 12, 'job_code': 'frontend_prices'})
[2026-11-28 14:57:34] INFO app.tasks.ingest.execute_ingest: Run 12 completed successfully
[2026-11-28 14:57:34] INFO harness.loopmodes: idle loop check for run 12: still set and open
"""  # noqa: E501

# A pre-fix failure as the worker logs it: Celery's task logger with a chained traceback.
PREFIX_FAILURE = """\
[2026-11-28 15:10:01] INFO app.tasks.ingest.execute_ingest: Starting run 7
[2026-11-28 15:10:01] ERROR app.tasks.ingest.execute_ingest: Run 7 failed: RuntimeError: asyncio.run() cannot be called from a running event loop
[2026-11-28 15:10:01] ERROR celery.app.trace: Task app.tasks.ingest.execute_ingest[5c1f] raised unexpected: RuntimeError('boom')
Traceback (most recent call last):
  File "/work/main/app/tasks/ingest.py", line 190, in run_ingest
    stats = asyncio_runner.run_async_safe(
            ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/asyncio/runners.py", line 186, in run
    raise RuntimeError(
RuntimeError: asyncio.run() cannot be called from a running event loop

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/celery/app/trace.py", line 479, in trace_task
    R = retval = fun(*args, **kwargs)
                 ^^^^^^^^^^^^^^^^^^^^
RuntimeError: boom
[2026-11-28 15:10:02] WARNING celery.redirected: /usr/lib/python3.11/asyncio/base_events.py: RuntimeWarning: coroutine 'execute_ingest_job' was never awaited
"""  # noqa: E501


def test_parses_the_runbook_example_exactly() -> None:
    lines = parse_log(RUNBOOK_EXAMPLE)

    assert [(line.ts, line.level, line.logger) for line in lines] == [
        (datetime(2026, 1, 27, 10, 0, 0), "INFO", TASK_LOGGER),
        (datetime(2026, 1, 27, 10, 0, 0), "INFO", RUNNER_LOGGER),
        (datetime(2026, 1, 27, 10, 5, 0), "INFO", TASK_LOGGER),
    ]
    assert [line.raw for line in lines] == RUNBOOK_EXAMPLE.splitlines()
    assert lines[0].message == "Starting run 123"


def test_templates_reproduce_the_runbook_lines() -> None:
    lines = parse_log(RUNBOOK_EXAMPLE)
    context = {"run_id": 123, "job_code": "frontend_prices"}

    assert lines[0].message == STARTING_TEMPLATE.format(run_id=123)
    assert lines[1].message == RUNNER_TEMPLATE.format(
        detected=False, strategy=STRATEGY_ASYNCIO_RUN, context=context
    )
    assert lines[2].message == COMPLETED_TEMPLATE.format(run_id=123)
    # The runbook's other runner line.
    assert RUNNER_TEMPLATE.format(
        detected=True, strategy=STRATEGY_THREAD_POOL, context=context
    ) == (
        "run_async_safe: detected_running_loop=True, using thread pool "
        "(context: {'run_id': 123, 'job_code': 'frontend_prices'})"
    )


def test_runner_line_is_parsed_into_its_parts() -> None:
    parsed = parse_runner_line(parse_log(RUNBOOK_EXAMPLE)[1])

    assert parsed is not None
    assert parsed.detected_running_loop is False
    assert parsed.strategy == STRATEGY_ASYNCIO_RUN
    assert parsed.context == {"run_id": 123, "job_code": "frontend_prices"}


def test_runner_line_from_another_logger_is_not_the_runner_line() -> None:
    text = RUNBOOK_EXAMPLE.splitlines()[1].replace(RUNNER_LOGGER, "somebody.else")

    assert parse_runner_line(parse_log(text)[0]) is None


def test_runner_lines_match_the_run_id_exactly_not_by_prefix() -> None:
    lines = parse_log(WORKER_LOG)

    run_123 = runner_lines(lines, 123)
    run_12 = runner_lines(lines, 12)

    assert [r.detected_running_loop for r in run_123] == [True]
    assert run_123[0].strategy == STRATEGY_THREAD_POOL
    assert [r.detected_running_loop for r in run_12] == [False]
    assert runner_lines(lines, 1) == []
    assert runner_lines(lines, 1234) == []


@pytest.mark.parametrize("context", ["{'run_id': True}", "{'run_id': '12'}", "None", "{'run_id"])
def test_runner_lines_ignore_contexts_without_that_integer(context: str) -> None:
    text = (
        "[2026-11-28 14:57:33] INFO app.utils.asyncio_runner: run_async_safe: "
        f"detected_running_loop=False, using asyncio.run() (context: {context})"
    )

    assert runner_lines(parse_log(text), 1) == []
    assert runner_lines(parse_log(text), 12) == []


def test_task_lines_select_one_run_in_order() -> None:
    lines = parse_log(WORKER_LOG)

    assert [line.message for line in task_lines(lines, 123)] == [
        "Starting run 123",
        FAILED_TEMPLATE.format(
            run_id=123,
            error="UnknownJobError: unknown job_code 'nojob'; known job codes: "
            "frontend_prices, stocks",
        ),
    ]
    assert [line.level for line in task_lines(lines, 123)] == ["INFO", "ERROR"]
    assert [line.message for line in task_lines(lines, 12)] == [
        "Starting run 12",
        "Run 12 completed successfully",
    ]
    assert task_lines(lines, 1) == []


def test_harness_lines_and_celery_trace_lines() -> None:
    lines = parse_log(WORKER_LOG)

    assert [line.message for line in harness_lines(lines, 12)] == [
        LOOP_MODE_TEMPLATE.format(run_id=12, mode="idle_loop", source="HARNESS_DEFAULT_LOOP_MODE"),
        IDLE_CHECK_OK_TEMPLATE.format(run_id=12),
    ]
    traced = trace_lines(lines, "ba8ea007-29a1-40be-b5a6-2c1d430ef357")
    assert len(traced) == 1
    assert "succeeded in" in traced[0].message


def test_the_end_a_task_line_promises() -> None:
    lines = parse_log(WORKER_LOG)
    assert promised_end(lines, 12) == "success"
    assert promised_end(lines, 1) is None
    failed = parse_log(
        "[2026-01-01 00:00:00] INFO app.tasks.ingest.execute_ingest: Starting run 3\n"
        "[2026-01-01 00:00:01] ERROR app.tasks.ingest.execute_ingest: Run 3 failed: X: y\n"
    )
    assert promised_end(failed, 3) == "failed"
    assert promised_end(failed[:1], 3) is None


def test_the_shims_job_fault_and_shared_loop_lines_are_its_own() -> None:
    text = "".join(
        f"[2026-01-01 00:00:00] {level} harness.loopmodes: {message}\n"
        for level, message in [
            ("INFO", LOOP_MODE_TEMPLATE.format(run_id=4, mode="no_loop", source="default")),
            ("INFO", JOB_FAULT_TEMPLATE.format(run_id=4, fault="cancelled")),
            ("WARNING", SHARED_LOOP_TEMPLATE.format(run_id=4)),
            ("INFO", JOB_FAULT_TEMPLATE.format(run_id=5, fault="cancelled")),
        ]
    )
    assert [line.headline for line in harness_lines(parse_log(text), 4)] == [
        LOOP_MODE_TEMPLATE.format(run_id=4, mode="no_loop", source="default"),
        JOB_FAULT_TEMPLATE.format(run_id=4, fault="cancelled"),
        SHARED_LOOP_TEMPLATE.format(run_id=4),
    ]


def test_idle_check_failure_line_matches_its_regex() -> None:
    message = IDLE_CHECK_FAILED_TEMPLATE.format(run_id=5, detail="the loop was closed")
    match = IDLE_CHECK_RE.match(message)

    assert match is not None
    assert match["run_id"] == "5"
    assert match["ok"] is None
    assert match["detail"] == "the loop was closed"


def test_output_before_logging_was_set_up_is_kept_line_by_line() -> None:
    lines = parse_log(WORKER_LOG)

    assert lines[0].ts is None
    assert lines[0].level == ""
    assert "SecurityWarning" in lines[0].message
    assert lines[1].message == "absolutely not recommended!"
    assert lines[3].logger == "celery.worker.consumer.connection"


def test_continuation_lines_attach_to_the_previous_record() -> None:
    lines = parse_log(PREFIX_FAILURE)

    trace = lines[2]
    assert trace.logger == "celery.app.trace"
    assert trace.headline.startswith("Task app.tasks.ingest.execute_ingest[5c1f] raised")
    assert trace.message.endswith("RuntimeError: boom")
    assert trace.raw.count("\n") == len(trace.message.splitlines()) - 1
    assert lines[3].level == "WARNING"
    assert len(lines) == 4


def test_find_forbidden_looks_in_messages_and_tracebacks() -> None:
    lines = parse_log(PREFIX_FAILURE)

    found = find_forbidden(lines)

    assert [line.logger for line in found] == [TASK_LOGGER, "celery.app.trace"]
    assert FORBIDDEN_TEXT in found[0].headline
    assert find_forbidden(parse_log(WORKER_LOG)) == []


def test_tracebacks_keep_a_chain_in_one_block() -> None:
    blocks = tracebacks(parse_log(PREFIX_FAILURE))

    assert len(blocks) == 1
    block = blocks[0].splitlines()
    assert block[0] == "Traceback (most recent call last):"
    assert "During handling of the above exception, another exception occurred:" in block
    assert block[-1] == "RuntimeError: boom"
    assert f"RuntimeError: {FORBIDDEN_TEXT}" in block


def test_tracebacks_before_logging_and_back_to_back() -> None:
    text = """\
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
ModuleNotFoundError: No module named 'harness.no_such_module'
[2026-11-28 15:10:02] ERROR x: first
Traceback (most recent call last):
  File "a.py", line 1, in <module>
ValueError: one
Traceback (most recent call last):
  File "b.py", line 2, in <module>
KeyError: 'two'
after the tracebacks
"""
    blocks = tracebacks(parse_log(text))

    assert [block.splitlines()[-1] for block in blocks] == [
        "ModuleNotFoundError: No module named 'harness.no_such_module'",
        "ValueError: one",
        "KeyError: 'two'",
    ]


def test_read_log_file_from_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    path.write_text(RUNBOOK_EXAMPLE)
    offset = len(RUNBOOK_EXAMPLE.splitlines(keepends=True)[0].encode())

    [runner, completed] = read_log_file(path, offset=offset)
    assert runner.message.startswith("run_async_safe:")
    assert completed.message == "Run 123 completed successfully"
    assert read_log_file(tmp_path / "missing.log") == []


def test_log_line_headline_is_the_first_line() -> None:
    line = LogLine(ts=None, level="ERROR", logger="x", message="first\nsecond", raw="")

    assert line.headline == "first"
