"""execute_ingest's body in-process against a real Postgres and the real marketplace source.

The row and the log lines are asserted together, as the runbook's steps 3 and 4 do by hand.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import psycopg2
import pytest
from celery.exceptions import SoftTimeLimitExceeded, WorkerShutdown, WorkerTerminate
from sqlalchemy import Connection, create_engine, event, text

from app.api.store import mark_enqueue_failed
from app.config import Settings
from app.db import get_engine
from app.tasks.ingest import execute_ingest, run_ingest
from harness.core.runs import RunRow, RunStore
from harness.services._base import libpq_dsn
from harness.workers.marketplace import MarketplaceServer

RUNNER_FALSE = (
    "run_async_safe: detected_running_loop=False, using asyncio.run() "
    "(context: {{'run_id': {id}, 'job_code': '{job}'}})"
)
RUNNER_TRUE = (
    "run_async_safe: detected_running_loop=True, using thread pool "
    "(context: {{'run_id': {id}, 'job_code': '{job}'}})"
)


@pytest.fixture
def store(app_settings: Settings) -> Iterator[RunStore]:
    with RunStore(app_settings.database_url) as s:
        yield s


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def run_messages(caplog: pytest.LogCaptureFixture, run_id: int) -> list[str]:
    """The task's and the runner's messages for one run, in order."""
    wanted = {"app.tasks.ingest.execute_ingest", "app.utils.asyncio_runner"}
    return [
        r.getMessage()
        for r in caplog.records
        if r.name in wanted and (str(run_id) in r.getMessage())
    ]


def assert_finished(row: RunRow, status: str) -> None:
    assert row.status == status, row
    assert row.started_at is not None and row.finished_at is not None, row
    assert row.started_at.tzinfo is not None and row.finished_at.tzinfo is not None
    assert row.started_at <= row.finished_at
    assert row.duration_ms is not None
    expected_ms = (row.finished_at - row.started_at).total_seconds() * 1000
    assert abs(row.duration_ms - expected_ms) <= 1, (row.duration_ms, expected_ms)


def test_success_row_and_log_lines(
    store: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    run_id = store.create(project_id=1, marketplace_code=marketplace_code)
    outcome = run_ingest(run_id, celery_task_id="task-1")

    row = store.read(run_id)
    assert outcome.status == "success"
    assert_finished(row, "success")
    served = marketplace.expected(marketplace_code, "frontend_prices")
    assert row.stats_json is not None
    assert row.stats_json["ok"] is True
    assert row.stats_json["project_id"] == 1
    assert row.stats_json["domain"] == "frontend_prices"
    assert row.stats_json["marketplace"] == marketplace_code
    assert row.stats_json["fetched"] == len(served)
    assert row.stats_json["inserted"] == len(served)
    assert row.stats_json["updated"] == 0
    assert row.stats_json["pages"] == marketplace.expected_pages(
        marketplace_code, "frontend_prices"
    )
    assert row.error_message is None
    assert row.celery_task_id == "task-1"
    assert store.count_rows("frontend_prices", marketplace_code=marketplace_code) == len(served)
    assert run_messages(logs, run_id) == [
        f"Starting run {run_id}",
        RUNNER_FALSE.format(id=run_id, job="frontend_prices"),
        f"Run {run_id} completed successfully",
    ]


@pytest.mark.asyncio
async def test_running_loop_in_the_test_thread_uses_the_thread_path(
    store: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    """The runbook's "test environment" cause: the task's function called inside a running loop."""
    run_id = store.create(project_id=2, marketplace_code=marketplace_code, job_code="stocks")
    outcome = run_ingest(run_id)

    row = store.read(run_id)
    assert outcome.status == "success", row.error_message
    assert_finished(row, "success")
    assert row.stats_json is not None
    assert row.stats_json["domain"] == "stocks"
    assert row.stats_json["fetched"] == len(marketplace.expected(marketplace_code, "stocks"))
    assert run_messages(logs, run_id) == [
        f"Starting run {run_id}",
        RUNNER_TRUE.format(id=run_id, job="stocks"),
        f"Run {run_id} completed successfully",
    ]
    assert "cannot be called from a running event loop" not in logs.text


def test_job_raising_fails_the_run(
    store: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    marketplace.configure(marketplace_code, fail_always=True)
    run_id = store.create(marketplace_code=marketplace_code)
    outcome = run_ingest(run_id)

    row = store.read(run_id)
    assert outcome.status == "failed"
    assert_finished(row, "failed")
    assert row.stats_json is None
    assert row.error_message is not None
    assert row.error_message.startswith("SourceUnavailableError: ")
    assert "503" in row.error_message or "5" in row.error_message
    messages = run_messages(logs, run_id)
    assert messages[0] == f"Starting run {run_id}"
    assert messages[1] == RUNNER_FALSE.format(id=run_id, job="frontend_prices")
    assert messages[-1] == f"Run {run_id} failed: {row.error_message}"


def test_unknown_job_code_fails_with_a_clear_message(
    store: RunStore, logs: pytest.LogCaptureFixture
) -> None:
    run_id = store.create(job_code="no_such_job")
    run_ingest(run_id)

    row = store.read(run_id)
    assert_finished(row, "failed")
    assert row.error_message == (
        "UnknownJobError: unknown job_code 'no_such_job'; known job codes: frontend_prices, stocks"
    )
    assert run_messages(logs, run_id)[-1] == f"Run {run_id} failed: {row.error_message}"


def test_redelivered_message_is_a_logged_no_op(
    store: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    run_id = store.create(marketplace_code=marketplace_code)
    execute_ingest.apply(args=[run_id])  # the first delivery, through Celery's task machinery
    first = store.read(run_id)
    requests_after_first = len(marketplace.requests(marketplace_code))

    result = execute_ingest.apply(args=[run_id])  # the same message delivered again

    assert result.get() == {"run_id": run_id, "status": "skipped"}
    assert store.read(run_id) == first
    assert len(marketplace.requests(marketplace_code)) == requests_after_first
    messages = run_messages(logs, run_id)
    assert messages.count(f"Starting run {run_id}") == 1
    assert messages[-1] == (f"Run {run_id} is not queued (status: success); not executing it again")


def test_soft_time_limit_fails_the_run_with_timing(
    store: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    """Celery's soft limit is a signal handler raising SoftTimeLimitExceeded in the task's thread.

    The same happens here: an interval timer raises it while the job waits on a slow page.
    """
    marketplace.configure(marketplace_code, latency_s=5.0)

    def soft_limit(signum: int, frame: FrameType | None) -> None:
        raise SoftTimeLimitExceeded("soft time limit exceeded")

    previous = signal.signal(signal.SIGALRM, soft_limit)
    run_id = store.create(marketplace_code=marketplace_code)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        outcome = run_ingest(run_id)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - started

    row = store.read(run_id)
    assert outcome.status == "failed"
    assert elapsed < 4.0, "the soft limit must stop the job, not wait for the slow page"
    assert_finished(row, "failed")
    assert row.duration_ms is not None and row.duration_ms >= 250
    assert row.error_message is not None
    assert row.error_message.startswith("SoftTimeLimitExceeded: ")
    assert "timed out" in row.error_message
    assert run_messages(logs, run_id)[-1] == f"Run {run_id} failed: {row.error_message}"


def test_heartbeat_is_refreshed_while_the_job_runs(
    store: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
) -> None:
    marketplace.configure(marketplace_code, latency_s=0.2)
    run_id = store.create(marketplace_code=marketplace_code)
    worker = threading.Thread(target=run_ingest, args=(run_id,))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        beat_seen = False
        while time.monotonic() < deadline and not beat_seen:
            row = store.read(run_id)
            if row.status == "running" and row.heartbeat_at and row.started_at:
                beat_seen = row.heartbeat_at > row.started_at
            if row.terminal:
                break
            time.sleep(0.02)
    finally:
        worker.join(timeout=30)
    assert beat_seen, "heartbeat_at never moved past started_at while the run was running"
    assert store.read(run_id).status == "success"


def test_database_errors_keep_only_the_drivers_message() -> None:
    """error_message is shown by the API and the UI: no SQL statement, no row data in it."""
    from sqlalchemy.exc import OperationalError

    from app.tasks.ingest import describe_error

    exc = OperationalError(
        "INSERT INTO frontend_prices (sku, price) VALUES (%(sku)s, %(price)s)",
        {"sku": "SECRET-SKU", "price": "12.34"},
        Exception("server closed the connection unexpectedly"),
    )
    text = describe_error(exc, 2000)
    assert text == "OperationalError: server closed the connection unexpectedly"
    assert "SECRET-SKU" not in text and "INSERT" not in text


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (asyncio.CancelledError(), "CancelledError: the job was cancelled"),
        (
            asyncio.CancelledError("by the pool"),
            "CancelledError: the job was cancelled (by the pool)",
        ),
        (SystemExit(3), "SystemExit: the job called sys.exit(3)"),
        (SystemExit("bye"), "SystemExit: the job called sys.exit('bye')"),
        (KeyboardInterrupt(), "KeyboardInterrupt: the job was interrupted (SIGINT)"),
        (WorkerTerminate(1), "WorkerTerminate: the worker was shut down while the run ran"),
        (WorkerShutdown(0), "WorkerShutdown: the worker was shut down while the run ran"),
    ],
)
def test_what_is_not_an_exception_is_described_in_words(exc: BaseException, text: str) -> None:
    """A BaseException's own text is empty or a bare exit code: error_message says what it was."""
    from app.tasks.ingest import describe_error

    assert describe_error(exc, 2000) == text


def test_an_error_raised_by_celerys_shutdown_handler_says_the_worker_was_shut_down() -> None:
    from app.tasks.ingest import describe_error

    # As Celery 5.7's solo pool does from celery.apps.worker's cold shutdown handler.
    namespace: dict[str, object] = {"__name__": "celery.apps.worker"}
    exec("def handler():\n    raise NotImplementedError('does not implement kill_job')", namespace)
    try:
        namespace["handler"]()  # type: ignore[operator]
    except NotImplementedError as exc:
        text = describe_error(exc, 2000)
    assert text == (
        "the worker was shut down while the run ran (NotImplementedError: does not implement "
        "kill_job)"
    )
    assert describe_error(NotImplementedError("elsewhere"), 2000) == (
        "NotImplementedError: elsewhere"
    )


def _terminate(admin_url: str, pid: int) -> None:
    """End backend `pid` from another connection, and wait until it is gone."""
    conn = psycopg2.connect(libpq_dsn(admin_url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
                row = cur.fetchone()
                if row is not None and row[0] == 0:
                    return
                time.sleep(0.005)
        raise AssertionError(f"backend {pid} still there 10 s after pg_terminate_backend")
    finally:
        conn.close()


@pytest.mark.parametrize("moment", ["between_read_and_write", "at_commit"])
def test_the_finish_survives_its_connection_dying(
    moment: str,
    app_settings: Settings,
    store: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    """The finish's connection is terminated after its SELECT ... FOR UPDATE, or as it commits:
    the finish is retried on a new connection, and the row ends ``success``."""
    engine = get_engine()
    killed: list[int] = []

    def kill(conn: Connection) -> None:
        pid = conn.connection.dbapi_connection.get_backend_pid()  # type: ignore[union-attr]
        _terminate(app_settings.database_url, pid)
        killed.append(pid)

    def after_execute(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if killed:
            return
        if moment == "between_read_and_write" and "FOR UPDATE" in statement:
            kill(conn)
        if (
            moment == "at_commit"
            and statement.startswith("UPDATE ingest_runs")
            and ("finished_at" in statement)
        ):
            conn.info["finish_written"] = True

    def before_commit(conn: Connection) -> None:
        if moment == "at_commit" and not killed and conn.info.pop("finish_written", False):
            kill(conn)

    event.listen(engine, "after_cursor_execute", after_execute)
    event.listen(engine, "commit", before_commit)
    try:
        run_id = store.create(marketplace_code=marketplace_code)
        outcome = run_ingest(run_id)
    finally:
        event.remove(engine, "after_cursor_execute", after_execute)
        event.remove(engine, "commit", before_commit)

    assert killed, "the finish's connection was never terminated: the test proved nothing"
    assert outcome.status == "success"
    assert_finished(store.read(run_id), "success")
    assert any(
        f"Run {run_id}: could not record its end (attempt 1 of 5)" in m for m in logs.messages
    ), logs.text


def test_terminal_rows_store_sql_null_stats_and_a_duration(
    app_settings: Settings, store: RunStore, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, fail_always=True)
    failed = store.create(marketplace_code=marketplace_code)
    run_ingest(failed)
    unsent = store.create(marketplace_code=marketplace_code, job_code="stocks")
    assert mark_enqueue_failed(get_engine(), unsent, "enqueue failed: broker down")

    engine = create_engine(app_settings.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, stats_json IS NULL AS sql_null, finished_at, duration_ms "
                    "FROM ingest_runs WHERE id IN (:a, :b) ORDER BY id"
                ),
                {"a": failed, "b": unsent},
            ).all()
    finally:
        engine.dispose()
    # SQL NULL, which the runbook's `WHERE stats_json IS NULL` finds; not the JSON value null.
    assert [(r.id, r.sql_null) for r in rows] == [(failed, True), (unsent, True)]
    for row in rows:
        assert row.finished_at is not None and row.duration_ms is not None, row
