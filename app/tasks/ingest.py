"""The Celery task ``execute_ingest``: claim a queued run, run its async job, finish the row.

Every path that claimed a run finishes it: ``success`` with stats, or ``failed`` with the
error (also on Celery's soft time limit), always with finished_at and duration_ms. A run
that is not ``queued`` is never executed again, so a redelivered message is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from billiard.exceptions import WorkerLostError
from celery.exceptions import SoftTimeLimitExceeded, WorkerShutdown, WorkerTerminate
from celery.worker.request import Request
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from app.celery_app import celery_app
from app.clock import duration_ms, utcnow
from app.config import get_settings
from app.db import get_engine
from app.ingest import JobContext, execute_ingest_job
from app.models import IngestRun
from app.utils import asyncio_runner

__all__ = ["RunFailed", "RunOutcome", "describe_error", "execute_ingest", "run_ingest"]

logger = logging.getLogger("app.tasks.ingest.execute_ingest")

_FINISH_ATTEMPTS: Final = 5
_FINISH_BACKOFF_S: Final = 0.2


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What one execution did: ``skipped`` when the run was not ``queued``, ``superseded`` when
    it was finished by someone else (unlock_stale_runs) before the job ended."""

    run_id: int
    status: str
    stats: dict[str, Any] | None = None
    error_message: str | None = None


_SHUT_DOWN: Final = "the worker was shut down while the run ran"
# Where Celery's worker handles SIGINT, SIGTERM and SIGQUIT.
_SHUTDOWN_MODULE: Final = "celery.apps.worker"


def _raised_by_worker_shutdown(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == _SHUTDOWN_MODULE:
            return True
        tb = tb.tb_next
    return False


def describe_error(exc: BaseException, max_len: int | None = None) -> str:
    """The error as stored in ``error_message``: type and message, bounded in length."""
    limit = max_len or get_settings().error_message_max_len
    if isinstance(exc, SoftTimeLimitExceeded):
        text = (
            "SoftTimeLimitExceeded: the run timed out: it passed Celery's soft time limit "
            "and was stopped"
        )
    elif isinstance(exc, WorkerShutdown | WorkerTerminate):
        text = f"{type(exc).__name__}: {_SHUT_DOWN}"
    elif _raised_by_worker_shutdown(exc):
        # Celery's cold shutdown raises in the task's thread whatever its pool does: the solo
        # pool's "does not implement kill_job", for one. Say what happened, then what was raised.
        text = f"{_SHUT_DOWN} ({type(exc).__name__}: {str(exc).strip()})"
    elif isinstance(exc, SystemExit):
        text = f"SystemExit: the job called sys.exit({exc.code!r})"
    elif isinstance(exc, KeyboardInterrupt):
        text = "KeyboardInterrupt: the job was interrupted (SIGINT)"
    elif isinstance(exc, asyncio.CancelledError):
        message = str(exc).strip()
        text = "CancelledError: the job was cancelled" + (f" ({message})" if message else "")
    elif isinstance(exc, DBAPIError) and exc.orig is not None:
        # SQLAlchemy's own text carries the statement and its parameters (the rows' data);
        # the API and the UI show error_message, so keep only the driver's message.
        message = str(exc.orig).strip()
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    else:
        message = str(exc).strip()
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 15] + "... [truncated]"
    return text


def _claim(run_id: int, celery_task_id: str | None) -> JobContext | None:
    now = utcnow()
    stmt = (
        update(IngestRun)
        .where(IngestRun.id == run_id, IngestRun.status == "queued")
        .values(status="running", started_at=now, heartbeat_at=now, celery_task_id=celery_task_id)
        .returning(IngestRun.project_id, IngestRun.marketplace_code, IngestRun.job_code)
    )
    with get_engine().begin() as conn:
        row = conn.execute(stmt).first()
    if row is None:
        return None
    return JobContext(
        run_id=run_id,
        project_id=row.project_id,
        marketplace_code=row.marketplace_code,
        job_code=row.job_code,
    )


def _current_status(run_id: int) -> str | None:
    with get_engine().connect() as conn:
        row = conn.execute(
            IngestRun.__table__.select()
            .with_only_columns(IngestRun.status)
            .where(IngestRun.id == run_id)
        ).first()
    return None if row is None else str(row.status)


def _finish(run_id: int, status: str, *, stats: dict[str, Any] | None, error: str | None) -> bool:
    """Write the terminal state, retrying so a dropped connection never leaves it ``running``.

    False when the run was no longer ``running`` (somebody else finished it): nothing written."""
    last: SQLAlchemyError | None = None
    for attempt in range(1, _FINISH_ATTEMPTS + 1):
        finished_at = utcnow()
        # The try is around the whole transaction: the commit, where a dropped connection is
        # often noticed, raises as the `with` block exits.
        try:
            with get_engine().begin() as conn:
                started = conn.execute(
                    IngestRun.__table__.select()
                    .with_only_columns(IngestRun.started_at)
                    .where(IngestRun.id == run_id, IngestRun.status == "running")
                    .with_for_update()
                ).scalar_one_or_none()
                if started is None:
                    # Somebody else finished it (unlock_stale_runs): never overwrite that.
                    logger.warning(
                        "Run %s was no longer running when it finished: its end (%s) is not "
                        "recorded, the row keeps what finished it first",
                        run_id,
                        status,
                    )
                    return False
                conn.execute(
                    update(IngestRun)
                    .where(IngestRun.id == run_id)
                    .values(
                        status=status,
                        finished_at=finished_at,
                        duration_ms=duration_ms(_aware(started), finished_at),
                        stats_json=stats,
                        error_message=error,
                        heartbeat_at=finished_at,
                    )
                )
            return True
        except SQLAlchemyError as exc:
            last = exc
        logger.warning(
            "Run %s: could not record its end (attempt %d of %d): %s",
            run_id,
            attempt,
            _FINISH_ATTEMPTS,
            describe_error(last, 300),
        )
        time.sleep(_FINISH_BACKOFF_S * attempt)
    assert last is not None
    raise last


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:  # pragma: no cover - the column is timestamptz
        raise ValueError("ingest_runs.started_at must be timezone-aware")
    return value


class _Heartbeat:
    """Refreshes heartbeat_at while the job runs, so a long healthy run never looks stale."""

    def __init__(self, run_id: int, interval_s: float) -> None:
        self._run_id = run_id
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-run-{run_id}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                with get_engine().begin() as conn:
                    conn.execute(
                        update(IngestRun)
                        .where(IngestRun.id == self._run_id, IngestRun.status == "running")
                        .values(heartbeat_at=utcnow())
                    )
            except SQLAlchemyError as exc:
                # A missed beat is not fatal; the next one may succeed.
                logger.warning(
                    "Run %s: heartbeat failed: %s", self._run_id, describe_error(exc, 300)
                )


def run_ingest(run_id: int, *, celery_task_id: str | None = None) -> RunOutcome:
    """The task's body, callable in-process (that is how the tests reach the running-loop case)."""
    ctx = _claim(run_id, celery_task_id)
    if ctx is None:
        status = _current_status(run_id)
        logger.info(
            "Run %s is not queued (status: %s); not executing it again",
            run_id,
            status if status is not None else "no such run",
        )
        return RunOutcome(run_id=run_id, status="skipped")

    logger.info("Starting run %s", run_id)
    settings = get_settings()
    try:
        with _Heartbeat(run_id, settings.heartbeat_interval_s):
            stats = asyncio_runner.run_async_safe(
                execute_ingest_job(ctx, settings),
                context={"run_id": run_id, "job_code": ctx.job_code},
            )
    except BaseException as exc:
        error = describe_error(exc, settings.error_message_max_len)
        if _finish(run_id, "failed", stats=None, error=error):
            logger.error("Run %s failed: %s", run_id, error)
        if isinstance(exc, WorkerShutdown | WorkerTerminate):
            raise  # Celery stopping its worker: the row is finished, the worker may go
        # Anything else, BaseException or not (CancelledError, a library's sys.exit(), a
        # KeyboardInterrupt raised in the job), is the job's failure, and the task says so as
        # for any other: re-raised, it would kill a prefork child (its message is delivered
        # again) and crash a solo worker outright (Celery 5.7's apply_target hands the
        # BaseException to on_success, which raises TypeError).
        return RunOutcome(run_id=run_id, status="failed", error_message=error)

    if not _finish(run_id, "success", stats=stats, error=None):
        # Unlocked meanwhile (unlock_stale_runs): its row stays as the unlock left it, and no
        # line says "completed", which would promise a success row.
        return RunOutcome(run_id=run_id, status="superseded", stats=stats)
    logger.info("Run %s completed successfully", run_id)
    return RunOutcome(run_id=run_id, status="success", stats=stats)


def _fail_from_main_process(args: Any, error: str) -> None:
    """Finish the run of a pool child that died running it, from the worker's main process.

    _finish changes only a ``running`` row, so a run the child did finish stays as it is.
    """
    try:
        run_id = int(args[0])
    except (IndexError, TypeError, ValueError):
        logger.error("execute_ingest's worker process died; its arguments %r name no run", args)
        return
    if _finish(run_id, "failed", stats=None, error=error):
        logger.error("Run %s failed: %s", run_id, error)


def _channel_closed(message: Any) -> bool:
    """Whether the broker channel ``message`` came on is closed, so that no ack can reach it."""
    channel = getattr(message, "channel", None)
    if channel is None or getattr(channel, "closed", False):  # kombu's virtual channels
        return True
    if getattr(channel, "is_open", True) is False:  # py-amqp's
        return True
    transport = getattr(channel, "connection", None)
    return transport is None or getattr(transport, "client", True) is None


class IngestRequest(Request):  # type: ignore[misc]
    """The worker main process's view of one execute_ingest message.

    When the pool child running it is killed (Celery's hard time limit, the OOM killer, a
    segfault), the child cannot finish its row; the main process knows at once, and finishes
    it here as ``failed`` with the reason, rather than leaving it ``running`` until
    unlock_stale_runs comes by.

    When the broker connection the message came on closed while the run ran, its ack cannot
    be delivered: one warning says so (where Celery would log a CRITICAL traceback), and the
    broker delivers the message again after the visibility timeout, as a no-op.
    """

    def acknowledge(self) -> None:
        if not self.acknowledged and _channel_closed(self.message):
            self._unacknowledged("acknowledge")
            return
        super().acknowledge()

    def reject(self, requeue: bool = False) -> None:
        if not self.acknowledged and _channel_closed(self.message):
            self._unacknowledged("reject")
            return
        super().reject(requeue=requeue)

    def _unacknowledged(self, verb: str) -> None:
        self.acknowledged = True  # nothing more can be done with this delivery
        logger.warning(
            "Could not %s the message of run %s: its broker connection closed while it ran; "
            "the broker delivers it again after APP_BROKER_VISIBILITY_TIMEOUT_S (%g s), and "
            "a run that is no longer queued makes that delivery a no-op",
            verb,
            self.args[0] if self.args else "?",
            get_settings().broker_visibility_timeout_s,
        )

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            _fail_from_main_process(
                self.args,
                f"TimeLimitExceeded: the run passed Celery's hard time limit ({timeout} s) "
                "and its worker process was killed",
            )

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
        if isinstance(exc, WorkerLostError):
            _fail_from_main_process(
                self.args, f"WorkerLostError: the worker process running it died: {exc}"
            )


class RunFailed(Exception):
    """The task's outcome for a run that ended ``failed``, so that Celery (its result backend,
    Flower, its log) says the task failed, as the row does. An expected error (``throws``):
    Celery logs one line, "raised expected", at INFO, with no second traceback; the run's
    own error line was logged already."""


@celery_app.task(
    name="app.tasks.ingest.execute_ingest", bind=True, throws=(RunFailed,), Request=IngestRequest
)
def execute_ingest(self: Any, run_id: int) -> dict[str, Any]:
    outcome = run_ingest(int(run_id), celery_task_id=self.request.id)
    if outcome.status == "failed":
        raise RunFailed(f"run {outcome.run_id} failed: {outcome.error_message}")
    return {"run_id": outcome.run_id, "status": outcome.status}
