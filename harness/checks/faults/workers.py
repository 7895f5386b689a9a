"""``FaultWorkers``: the fault scenarios' own Celery workers (quick heartbeats, kombu's quick
redelivery where asked), each stopped, or killed if it must be, at the test's end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from harness.checks.faults._settings import (
    FAULT_WORKER_APP,
    HEARTBEAT_INTERVAL_S,
    logger,
)
from harness.checks.faults.broker import delete_queue, forget_unacked
from harness.core.logs import LogLine
from harness.workers.process import CeleryWorkerProcess, app_env, mask_secrets

__all__ = ["FaultWorkers"]


class FaultWorkers:
    """Dedicated Celery workers for fault scenarios (they get killed), stopped together at the end.

    Never the farm's shared workers: a killed or stopped worker must not be one another
    scenario relies on. Each worker gets the service's environment (``app_env``) with a
    heartbeat every :data:`HEARTBEAT_INTERVAL_S`, one marketplace request at a time (so a
    held source holds: :func:`hold_source`), its own name and log file in ``log_dir``, and runs
    :data:`FAULT_WORKER_APP`. ``shared_queue()`` names a queue several workers consume (a
    message the first one leaves unacknowledged is redelivered to the next); such queues are
    deleted from the broker by :meth:`stop_all`.

    Start workers from the thread that outlives them (pytest's main thread): see
    ``CeleryWorkerProcess``.
    """

    def __init__(
        self,
        *,
        database_url: str,
        broker_url: str,
        marketplace_url: str,
        log_dir: Path,
        runner: str = "fixed",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.database_url = database_url
        self.broker_url = broker_url
        self.marketplace_url = marketplace_url
        self.log_dir = log_dir
        self.runner = runner
        self.env = dict(env or {})
        self.workers: list[CeleryWorkerProcess] = []
        self._queues: list[str] = []

    def shared_queue(self) -> str:
        """A queue name for several workers in turn; deleted from the broker by stop_all()."""
        name = f"harness-faults-{_xdist_worker()}-{uuid.uuid4().hex[:8]}"
        self._queues.append(name)
        return name

    def start(
        self,
        *,
        pool: str = "solo",
        concurrency: int = 1,
        queue: str | None = None,
        transport_options: Mapping[str, Any] | None = None,
        stuck_past_soft_limit: bool = False,
        stall_before_task: bool = False,
        **app_env_overrides: str,
    ) -> CeleryWorkerProcess:
        """Start one worker and return it once it answers a ping.

        ``app_env_overrides`` are further ``APP_*`` settings (``APP_HTTP_TIMEOUT_S="0.4"``);
        ``transport_options`` go to the broker connection (see
        :data:`REDELIVERY_TRANSPORT_OPTIONS`); ``stuck_past_soft_limit`` makes its pool
        children ignore the soft time limit, as a job stuck in a C call does, so that only the
        hard limit ends a run; ``stall_before_task`` makes every task stall before its body,
        holding its message unacknowledged with the run still queued, until the worker is
        killed (both: ``harness.workers.fault_worker_app``).
        """
        overrides = {
            "APP_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
            "APP_HTTP_CONCURRENCY": "1",
            **self.env,
        }
        overrides.update(app_env_overrides)
        extra = {"HARNESS_RUNNER": self.runner}
        if transport_options:
            extra["HARNESS_BROKER_TRANSPORT_OPTIONS"] = json.dumps(dict(transport_options))
        if stuck_past_soft_limit:
            extra["HARNESS_FAULT_STUCK_PAST_SOFT_LIMIT"] = "1"
        if stall_before_task:
            extra["HARNESS_FAULT_STALL_BEFORE_TASK"] = "1"
        worker = CeleryWorkerProcess(
            env=app_env(
                database_url=self.database_url,
                broker_url=self.broker_url,
                marketplace_url=self.marketplace_url,
                **overrides,
            ),
            log_dir=self.log_dir,
            pool=pool,
            concurrency=concurrency,
            queue=queue,
            # Its own name (so its own log file and ping) even on a queue another one shares.
            node_name=f"harness-faults-{_xdist_worker()}-{uuid.uuid4().hex[:8]}",
            extra_env=extra,
            app=FAULT_WORKER_APP,
        )
        self.workers.append(worker)  # before start(): a failed start's log is evidence too
        worker.start()
        return worker

    def marks(self) -> dict[str, int]:
        """Each worker's log position now, to read only what a scenario made them write."""
        return {w.node_name: w.log_mark() for w in self.workers}

    def log_lines(self, since: Mapping[str, int] | None = None) -> list[LogLine]:
        """Every worker's log lines (since ``marks()``; default: since each one's start)."""
        lines: list[LogLine] = []
        for worker in self.workers:
            lines.extend(worker.log_lines((since or {}).get(worker.node_name)))
        return lines

    def log_text(self, since: Mapping[str, int] | None = None, limit: int = 80) -> str:
        """Each worker's log (its last ``limit`` lines), for a failure report."""
        blocks = []
        for worker in self.workers:
            text = worker.read_log((since or {}).get(worker.node_name)).splitlines()
            state = "alive" if worker.is_alive() else f"exit code {worker.returncode}"
            shown = "\n".join(mask_secrets(line) for line in text[-limit:]) or "(empty)"
            blocks.append(
                f"--- {worker.node_name} ({worker.pool}, {state}) {worker.log_path}\n{shown}"
            )
        return "\n".join(blocks) or "(no worker was started)"

    def stop_all(self) -> None:
        """Stop every worker side by side (warm shutdown, then kill); never raises.

        A worker a scenario stopped with SIGSTOP is continued first: a stopped process ignores
        SIGTERM, and its warm shutdown would wait for the kill deadline.
        """
        workers, self.workers = self.workers, []
        threads = [
            threading.Thread(target=_stop_one, args=(w,), name=f"stop-{w.node_name}")
            for w in workers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        queues, self._queues = self._queues, []
        for queue in queues:
            delete_queue(self.broker_url, queue)
        # A killed worker's unacknowledged message would otherwise stay in the broker for the
        # rest of the session, and a later worker with a short visibility timeout would put it
        # back on a queue nobody consumes.
        if self.broker_url.startswith(("redis://", "rediss://")):
            forget_unacked(self.broker_url, {w.queue for w in workers} | set(queues))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def _xdist_worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def _stop_one(worker: CeleryWorkerProcess) -> None:
    try:
        if worker.is_alive():
            worker.kill(signal.SIGCONT)
        worker.stop(timeout=5.0)
    except Exception:
        logger.exception("stopping %s failed; killing its process group", worker)
        with contextlib.suppress(Exception):
            worker.kill(signal.SIGKILL)
