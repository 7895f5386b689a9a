"""The report service's Celery app and its task, ``examples.reports.build``."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from celery import Celery
from sqlalchemy import create_engine, text

from examples.reports import bridge
from examples.reports.jobs import build_report

__all__ = ["build", "celery_app"]

logger = logging.getLogger("examples.reports.task")

celery_app = Celery(
    "reports", broker=os.environ.get("REPORTS_BROKER_URL", "redis://127.0.0.1:6379/1")
)
celery_app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=True,
    worker_log_format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
    worker_task_log_format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
)
_engine = create_engine(
    os.environ.get("REPORTS_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1/reports"),
    pool_pre_ping=True,
)

_CLAIM = text(
    "UPDATE report_jobs SET state = 'building', begun_at = clock_timestamp() "
    "WHERE id = :id AND state = 'pending' RETURNING tenant, kind"
)
_END = text(
    "UPDATE report_jobs SET state = :state, ended_at = clock_timestamp(), "
    "elapsed_ms = (EXTRACT(EPOCH FROM clock_timestamp() - begun_at) * 1000)::int, "
    "result = CAST(:result AS JSONB), failure = :failure "
    "WHERE id = :id AND state = 'building'"
)


def _end(job_id: int, state: str, result: dict[str, Any] | None, failure: str | None) -> None:
    with _engine.begin() as conn:
        conn.execute(
            _END,
            {
                "id": job_id,
                "state": state,
                "result": None if result is None else json.dumps(result),
                "failure": failure,
            },
        )


def _build(job_id: int) -> str:
    with _engine.begin() as conn:
        claimed = conn.execute(_CLAIM, {"id": job_id}).first()
    if claimed is None:
        logger.info("Report %s is not pending; skipped", job_id)
        return "skipped"
    logger.info("Building report %s", job_id)
    try:
        result = bridge.run_coro(build_report(claimed.tenant, claimed.kind), f"report {job_id}")
    except BaseException as exc:
        failure = f"{type(exc).__name__}: {exc}"[:500]
        _end(job_id, "error", None, failure)
        logger.error("Report %s failed: %s", job_id, failure)
        if not isinstance(exc, Exception):
            raise
        return "error"
    _end(job_id, "done", result, None)
    logger.info("Report %s built", job_id)
    return "done"


@celery_app.task(name="examples.reports.build")
def build(job_id: int) -> str:
    return _build(int(job_id))
