"""How the API hands a run to the workers: ``Enqueue`` and its Celery implementation.

An ``Enqueue`` takes a run id, sends ``execute_ingest`` for it and returns the task id (or
``None`` when it has none); it raises when the message could not be sent, and the API then
marks the run ``failed`` rather than leaving it ``queued`` forever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

__all__ = ["DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_PUBLISH_RETRIES", "CeleryEnqueue", "Enqueue"]

Enqueue = Callable[[int], str | None]

# A request waits for the broker at most about connect timeout x (retries + 1): long enough for
# a broker that is merely slow, short enough that a person clicking "start" gets an answer.
DEFAULT_CONNECT_TIMEOUT_S: Final = 2.0
DEFAULT_PUBLISH_RETRIES: Final = 2


class CeleryEnqueue:
    """Sends ``execute_ingest.apply_async(args=[run_id])`` to ``broker_url``.

    The service's Celery app was configured from the environment when it was imported; this
    opens a connection to the URL given here for every message, so an API built with other
    settings (a test's broker, another port) never publishes to that stale broker. Routing,
    serializer and the rest still come from the Celery app's configuration; ``queue`` overrides
    the queue (the harness gives each worker its own).
    """

    def __init__(
        self,
        broker_url: str,
        *,
        queue: str | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        publish_retries: int = DEFAULT_PUBLISH_RETRIES,
    ) -> None:
        self._broker_url = broker_url
        self._queue = queue
        self._connect_timeout_s = connect_timeout_s
        self._publish_retries = publish_retries

    def __call__(self, run_id: int) -> str | None:
        # Imported here, not at module level: the task module pulls in every job, and an API
        # that is given another enqueue (the tests) does not need any of them.
        from app.celery_app import celery_app
        from app.tasks.ingest import execute_ingest

        retry_policy = {
            "max_retries": self._publish_retries,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        }
        transport_options = {
            # kombu's own reconnect loop (used when the first channel is opened) follows these;
            # without them it retries until connect_timeout per attempt, then again.
            "max_retries": self._publish_retries,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
            # The Redis transport takes its socket timeouts from here, not from connect_timeout.
            "socket_connect_timeout": self._connect_timeout_s,
            "socket_timeout": max(self._connect_timeout_s, 5.0),
        }
        options: dict[str, Any] = {"retry": True, "retry_policy": retry_policy}
        if self._queue is not None:
            options["queue"] = self._queue
        with celery_app.connection_for_write(
            self._broker_url,
            connect_timeout=self._connect_timeout_s,
            transport_options=transport_options,
        ) as connection:
            result = execute_ingest.apply_async(args=[run_id], connection=connection, **options)
        task_id = getattr(result, "id", None)
        return str(task_id) if task_id is not None else None
