"""The Celery application of the ingestion service."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger
from pydantic import ValidationError

from app import broker_fixes
from app.config import describe_settings_error, get_settings
from app.logging_setup import configure_logging

__all__ = ["broker_transport_options", "celery_app"]


def broker_transport_options(visibility_timeout_s: float) -> dict[str, float]:
    """kombu's Redis options: redeliver what was not acknowledged in ``visibility_timeout_s``.

    kombu looks for such messages every ``unacked_restore_interval`` x
    ``unacked_restore_throttle`` seconds, 100 s by default; here every fifth of the timeout,
    between 1 and 10 s, so a stranded message is back within about 1.2 x the timeout.
    """
    return {
        "visibility_timeout": visibility_timeout_s,
        "unacked_restore_interval": min(10.0, max(1.0, visibility_timeout_s / 5)),
        "unacked_restore_throttle": 1,
    }


def _make_app() -> Celery:
    try:
        settings = get_settings()
    except ValidationError as exc:
        # The worker's command line imports this module: a wrong APP_* variable is a usage
        # error there, one line and exit code 2, not pydantic's traceback.
        print(f"app.celery_app: {describe_settings_error(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
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
        broker_transport_options=broker_transport_options(settings.broker_visibility_timeout_s),
        worker_hijack_root_logger=True,
        worker_log_format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
        worker_task_log_format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
        worker_redirect_stdouts_level="INFO",
    )
    return app


broker_fixes.install()
celery_app = _make_app()


@after_setup_logger.connect
def _runbook_log_format(logger: logging.Logger, loglevel: int, **_: Any) -> None:
    # Celery's own format has no date format setting; the runbook's lines use seconds only.
    configure_logging(loglevel, logger)


@after_setup_task_logger.connect
def _runbook_task_log_format(logger: logging.Logger, loglevel: int, **_: Any) -> None:
    configure_logging(loglevel, logger)
