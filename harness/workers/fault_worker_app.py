"""The Celery app of the fault scenarios' workers: ``harness.workers.worker_app`` plus broker
options.

``celery -A harness.workers.fault_worker_app worker ...`` is the harness's usual worker app (the
same tuning, loop-mode shim and runner choice) with extra kombu transport options taken from
``HARNESS_BROKER_TRANSPORT_OPTIONS`` (a JSON object). The redelivery scenarios need them: kombu's
Redis transport hands an unacknowledged message of a dead worker to another consumer only once
it is older than ``visibility_timeout`` (one hour by default), and looks for such messages every
``unacked_restore_interval`` x ``unacked_restore_throttle`` seconds (100 s by default).

A module of its own, not an option of ``harness.workers.worker_app``: the farm's workers must never
get a short visibility timeout (their own long runs would be handed out twice), so the scenarios
that need one say so by naming this app.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import Any, Final

from celery.signals import task_prerun, worker_ready

from harness.core.logs import STALLING_LINE
from harness.workers.worker_app import app, celery_app

__all__ = [
    "TRANSPORT_OPTIONS_ENV",
    "app",
    "celery_app",
    "parse_transport_options",
]

logger = logging.getLogger("harness.faults")

TRANSPORT_OPTIONS_ENV: Final = "HARNESS_BROKER_TRANSPORT_OPTIONS"
# "1": pool children ignore the soft time limit's signal, as a job stuck where Python cannot
# interrupt it (inside a C call) does; then only the hard time limit ends the run.
STUCK_PAST_SOFT_LIMIT_ENV: Final = "HARNESS_FAULT_STUCK_PAST_SOFT_LIMIT"
# "1": each task stalls before its body runs, so the worker holds the message, unacknowledged,
# with the run still queued: a worker that took a message and was lost before it started it.
STALL_BEFORE_TASK_ENV: Final = "HARNESS_FAULT_STALL_BEFORE_TASK"


def parse_transport_options(raw: str) -> dict[str, Any]:
    """``HARNESS_BROKER_TRANSPORT_OPTIONS``'s value as a dict; ValueError naming the fix."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(
            f"{TRANSPORT_OPTIONS_ENV} must be a JSON object such as "
            f'{{"visibility_timeout": 1}}, got {raw!r}: {exc}'
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"{TRANSPORT_OPTIONS_ENV} must be a JSON object such as "
            f'{{"visibility_timeout": 1}}, got a {type(value).__name__}'
        )
    return value


def _apply(env: Mapping[str, str]) -> None:
    raw = env.get(TRANSPORT_OPTIONS_ENV, "").strip()
    if not raw:
        return
    # Merged over what harness.workers.worker_app set (the short polling interval stays).
    celery_app.conf.broker_transport_options = {
        **(celery_app.conf.broker_transport_options or {}),
        **parse_transport_options(raw),
    }


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    # Logged once logging is set up, so the worker's log says which options it ran with.
    logger.info(
        "fault worker app: broker transport options %s",
        json.dumps(celery_app.conf.broker_transport_options or {}, sort_keys=True),
    )


def _ignore_soft_limit(**_: Any) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _stall(task_id: str | None = None, **_: Any) -> None:
    logger.warning(STALLING_LINE.format(task_id=task_id))
    while True:  # until the scenario kills the worker
        time.sleep(3600)


_apply(os.environ)
if os.environ.get(STALL_BEFORE_TASK_ENV) == "1":
    task_prerun.connect(_stall, weak=False)
if os.environ.get(STUCK_PAST_SOFT_LIMIT_ENV) == "1":
    # Before each task: the pool installs its own SIGUSR1 handler when a child starts.
    task_prerun.connect(_ignore_soft_limit, weak=False)
# connect() rather than the decorator form: Celery is untyped, and the function stays typed.
worker_ready.connect(_on_worker_ready, weak=False)
