"""The Celery application of the ingestion service."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger

from app.config import get_settings
from app.logging_setup import configure_logging

__all__ = ["celery_app"]


def _make_app() -> Celery:
    settings = get_settings()
    app = Celery("app", broker=settings.broker_url, include=["app.tasks.ingest"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        timezone="UTC",
        enable_utc=True,
        # A run is only acknowledged once it is finished; a redelivered message is harmless
        # because execute_ingest claims the row atomically and skips a run that is not queued.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.soft_time_limit_s,
        task_time_limit=settings.time_limit_s,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        worker_log_format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
        worker_task_log_format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
        worker_redirect_stdouts_level="INFO",
    )
    return app


celery_app = _make_app()


@after_setup_logger.connect
def _runbook_log_format(logger: logging.Logger, loglevel: int, **_: Any) -> None:
    # Celery's own format has no date format setting; the runbook's lines use seconds only.
    configure_logging(loglevel, logger)


@after_setup_task_logger.connect
def _runbook_task_log_format(logger: logging.Logger, loglevel: int, **_: Any) -> None:
    configure_logging(loglevel, logger)
