"""Fault tools: provoke the runbook's "Отладка" failures on the real stack and check what is left.

The runbook's debugging section is about runs stuck in ``running``, workers that fall over and
ingestions that never finish. These plain functions and classes let a scenario cause each of
those on real processes -- kill or stop a worker, drop the database's connections, hold the
marketplace so a run is reliably mid-flight -- and then assert the one invariant every fault
must leave behind (:func:`assert_fault_invariants`). The fault scenarios are in
``scenarios/faults/``; ``docs/faults.md`` says what each proves.

Timing is never a blind sleep: a run is "mid-run" once its row is ``running`` and the marketplace
has seen its first request (:func:`wait_mid_run`), and the marketplace keeps it there until
:func:`release_source`.

Exceptions::

    AssertionError
     └── FaultInvariantError   a run left active, a duplicated or missing domain row, or an
                               unexpected traceback in a worker log after a fault
    TimeoutError               a wait's condition did not hold in time (with what was seen)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import kombu.connection
import kombu.entity
import psutil
import psycopg2
import redis
from sqlalchemy import Table, UniqueConstraint, text

from app.clock import utcnow
from app.maintenance import MESSAGE_PREFIX
from app.models import FrontendPrice, Stock
from harness.core.errors import CheckFailed
from harness.core.logs import LogLine, tracebacks
from harness.core.poll import poll_until
from harness.core.runs import RunRow, RunStore
from harness.services._base import libpq_dsn
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess, app_env, mask_secrets

__all__ = [
    "DOMAIN_KEYS",
    "FAULT_WORKER_APP",
    "HEARTBEAT_INTERVAL_S",
    "HELD_LATENCY_S",
    "REDELIVERY_TRANSPORT_OPTIONS",
    "STALE_AFTER",
    "Backend",
    "BackendTerminator",
    "FaultInvariantError",
    "FaultReport",
    "FaultWorkers",
    "RowsKey",
    "alive_pids",
    "assert_fault_invariants",
    "delete_queue",
    "forget_unacked",
    "hold_source",
    "message_in_redis",
    "queued_messages",
    "release_source",
    "served_rows",
    "start_held_run",
    "terminate_backends",
    "unacked_messages",
    "wait_acknowledged",
    "wait_answers_ping",
    "wait_dead",
    "wait_exited",
    "wait_for",
    "wait_heartbeat_fresh",
    "wait_heartbeat_older_than",
    "wait_mid_run",
]

logger = logging.getLogger("harness.faults")

T = TypeVar("T")

# The app the fault workers run: harness.workers.worker_app plus broker transport options.
FAULT_WORKER_APP: Final = "harness.workers.fault_worker_app"
# A beat every 0.2 s: a killed worker's run looks stale after a second, not after minutes.
HEARTBEAT_INTERVAL_S: Final = 0.2
# What "stale" means in the scenarios: five missed beats. A live worker's heartbeat thread is
# never that late, even on two busy cores; a dead one's run crosses it a second after the kill.
STALE_AFTER: Final = timedelta(seconds=1)
# kombu's Redis transport gives a dead consumer's unacknowledged message to another consumer
# once it is older than visibility_timeout (default 1 h), looking for such messages every
# unacked_restore_interval x unacked_restore_throttle s (default 10 x 10). One second and a
# look every 0.1 s make a redelivery take about a second. Only for workers that run no long
# task themselves: their own messages would be handed out again after a second too.
REDELIVERY_TRANSPORT_OPTIONS: Final[Mapping[str, Any]] = {
    "visibility_timeout": 1,
    "unacked_restore_interval": 0.1,
    "unacked_restore_throttle": 1,
}
# A held source answers each request after this long, so a run keeps fetching (and stays
# running) until release_source(); the request in flight finishes at most this long after it.
HELD_LATENCY_S: Final = 0.25
# The fault workers fetch one page at a time (APP_HTTP_CONCURRENCY=1), so a held run lasts
# pages x latency: 10 s, longer than any scenario holds one, and after the release the rest
# takes ~0.2 s (a page is ~5 ms).
_HELD_PAGES: Final = 40
_HELD_PAGE_SIZE: Final = 5
_POLL_S: Final = 0.01
_LOG_TAIL_LINES: Final = 30

RowsKey = tuple[str, int, str]
"""A domain table's rows of one project and marketplace: (table, project_id, marketplace_code)."""


# -- waiting ---------------------------------------------------------------------------------


def wait_for(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` every 10 ms until it returns non-None; TimeoutError saying ``what``.

    ``describe`` adds what was seen last to the error (a row, a log tail).
    """
    result = poll_until(check, timeout=timeout, interval=_POLL_S)
    if result is None:
        seen = f"; last seen: {describe()}" if describe is not None else ""
        raise TimeoutError(f"{what} did not happen within {timeout:g} s{seen}")
    return result


def _log_tail(worker: CeleryWorkerProcess) -> str:
    lines = worker.read_log().splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(f"    {mask_secrets(line)}" for line in lines) or "    (empty)"


def wait_mid_run(
    store: RunStore,
    run_id: int,
    *,
    marketplace: MarketplaceServer,
    code: str,
    worker: CeleryWorkerProcess | None = None,
    timeout: float = 20.0,
) -> RunRow:
    """Wait until run ``run_id`` is ``running`` and the marketplace has had its first request.

    Then the task has claimed the row, its heartbeat thread beats, and the job holds its
    database transaction open while it waits for the (held) source: the moment to provoke a
    fault. Fails at once if the run ends first (the source was not held) or ``worker`` dies.
    """
    last: list[RunRow | None] = [None]

    def check() -> RunRow | None:
        row = store.get(run_id)
        last[0] = row
        if row is not None and row.terminal:
            raise AssertionError(
                f"run {run_id} ended ({row.status}: {row.error_message}) before the fault "
                "could be provoked: hold its source with hold_source() before sending it"
            )
        if worker is not None and not worker.is_alive():
            raise AssertionError(
                f"worker {worker.node_name} exited (code {worker.returncode}) before run "
                f"{run_id} was mid-run; its log:\n{_log_tail(worker)}"
            )
        if row is not None and row.status == "running" and marketplace.requests(code).count:
            return row
        return None

    def describe() -> str:
        row = last[0]
        state = "no row" if row is None else f"status {row.status!r}"
        seen = marketplace.requests(code).count
        tail = f"\n  worker log:\n{_log_tail(worker)}" if worker is not None else ""
        return f"run {run_id}: {state}, {seen} marketplace requests for {code}{tail}"

    return wait_for(
        check, timeout=timeout, what=f"run {run_id} running and fetching", describe=describe
    )


def wait_heartbeat_older_than(
    store: RunStore, run_id: int, age: timedelta, *, timeout: float = 20.0
) -> RunRow:
    """Wait until run ``run_id``'s last heartbeat is older than ``age`` (by the harness's clock,
    the one ``unlock_stale_runs`` judges by); return the row."""

    def check() -> RunRow | None:
        row = store.read(run_id)
        seen = row.heartbeat_at or row.started_at
        return row if seen is not None and utcnow() - seen > age else None

    return wait_for(
        check,
        timeout=timeout,
        what=f"run {run_id}'s heartbeat getting older than {age.total_seconds():g} s",
        describe=lambda: repr(store.get(run_id)),
    )


def wait_heartbeat_fresh(
    store: RunStore, run_id: int, within: timedelta, *, timeout: float = 20.0
) -> RunRow:
    """Wait until run ``run_id`` is ``running`` with a heartbeat younger than ``within``.

    Taken just before an unlock, it makes "a live run's heartbeat is fresh" a fact checked at
    that moment, not a bet on the heartbeat thread's timing on a busy machine.
    """

    def check() -> RunRow | None:
        row = store.read(run_id)
        beat = row.heartbeat_at
        fresh = row.status == "running" and beat is not None and utcnow() - beat < within
        return row if fresh else None

    return wait_for(
        check,
        timeout=timeout,
        what=f"a heartbeat of run {run_id} younger than {within.total_seconds():g} s",
        describe=lambda: repr(store.get(run_id)),
    )


def alive_pids(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that are still running (a zombie has died; only its entry is left)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def wait_dead(pids: Sequence[int], *, timeout: float = 5.0) -> None:
    """Wait until none of ``pids`` is running (a killed process group's last members)."""
    wait_for(
        lambda: True if not alive_pids(pids) else None,
        timeout=timeout,
        what=f"the end of processes {list(pids)}",
        describe=lambda: f"still running: {alive_pids(pids)}",
    )


def wait_answers_ping(worker: CeleryWorkerProcess, *, timeout: float = 10.0) -> None:
    """Wait until the worker answers a control ping (it is alive and connected to the broker).

    A ping that fails with a broker connection error is retried: after a broker restart the
    harness's own pooled connection is the first to notice it is closed, and kombu drops it.
    """
    errors: list[str] = []

    def check() -> bool | None:
        if not worker.is_alive():
            raise AssertionError(
                f"worker {worker.node_name} exited (code {worker.returncode}); its log:\n"
                f"{_log_tail(worker)}"
            )
        try:
            return True if worker.ping(timeout=0.2) else None
        except Exception as exc:  # the client's connection, not the worker, failed
            errors.append(repr(exc))
            return None

    wait_for(
        check,
        timeout=timeout,
        what=f"worker {worker.node_name} answering a ping",
        describe=lambda: f"errors {errors[-3:]}; its log:\n{_log_tail(worker)}",
    )


def wait_exited(worker: CeleryWorkerProcess, *, timeout: float = 20.0) -> int:
    """Wait until the worker's main process has exited; return its exit code."""
    return wait_for(
        lambda: worker.returncode,
        timeout=timeout,
        what=f"the exit of worker {worker.node_name}",
        describe=lambda: f"still running; its log:\n{_log_tail(worker)}",
    )


# -- the marketplace as a valve --------------------------------------------------------------


def hold_source(
    marketplace: MarketplaceServer, code: str, *, latency_s: float = HELD_LATENCY_S
) -> None:
    """Make ``code``'s marketplace slow and long, so a run on it stays mid-run until released.

    Every request waits ``latency_s``; there are 40 pages of 5 items, fetched one at a time by
    a fault worker, so the run cannot end on its own within any test (10 s). The data stays the
    same after :func:`release_source`.
    """
    marketplace.configure(code, latency_s=latency_s, pages=_HELD_PAGES, page_size=_HELD_PAGE_SIZE)


def start_held_run(
    store: RunStore,
    worker: CeleryWorkerProcess,
    marketplace: MarketplaceServer,
    *,
    project_id: int,
    loop_mode: str = "no_loop",
    **send_options: Any,
) -> tuple[int, str]:
    """Create a run on a fresh, held marketplace code, send it to ``worker`` and return
    (run id, code) once it is mid-run (:func:`wait_mid_run`): the moment to provoke a fault.

    ``send_options`` go to ``worker.send`` (``soft_time_limit=...``).
    """
    code = f"mp-{uuid.uuid4().hex[:8]}"
    hold_source(marketplace, code)
    run_id = store.create(project_id=project_id, marketplace_code=code)
    worker.send(run_id, loop_mode=loop_mode, **send_options)
    wait_mid_run(store, run_id, marketplace=marketplace, code=code, worker=worker)
    return run_id, code


def release_source(marketplace: MarketplaceServer, code: str) -> None:
    """Let a held run finish: its next requests are answered at once."""
    marketplace.configure(code, latency_s=0.0)


def served_rows(
    marketplace: MarketplaceServer,
    code: str,
    *,
    project_id: int,
    domain: str = "frontend_prices",
) -> dict[RowsKey, int]:
    """The domain rows a successful run of ``code`` leaves: one per item the source serves."""
    items = marketplace.expected(code, domain)
    if domain == "frontend_prices":
        count = len({item["sku"] for item in items})
    else:
        count = len({(item["sku"], item["warehouse"]) for item in items})
    return {(domain, project_id, code): count}


# -- Postgres --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backend:
    """A Postgres session that :func:`terminate_backends` ended."""

    pid: int
    application_name: str
    state: str | None
    backend_type: str


def terminate_backends(database_url: str) -> list[Backend]:
    """``pg_terminate_backend`` every other session of the database; return the ones it ended.

    What an administrator, a failover or a connection-pooler restart does to the service: every
    connection the worker holds (the job's async one mid-transaction, the task's pooled sync
    ones) is closed by the server, with ``FATAL: terminating connection due to administrator
    command``.
    """
    conn = psycopg2.connect(libpq_dsn(database_url), connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            # The call in the select list, not in WHERE: Postgres may evaluate WHERE's terms in
            # any order, and would then end this very session too.
            cur.execute(
                "SELECT pid, application_name, state, backend_type, pg_terminate_backend(pid)"
                " FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            ended = [
                Backend(int(pid), str(app or ""), state, str(kind))
                for pid, app, state, kind, done in cur.fetchall()
                if done
            ]
    finally:
        conn.close()
    logger.debug("terminated %d backends: %s", len(ended), ended)
    return ended


class BackendTerminator:
    """A database that keeps dropping connections: :func:`terminate_backends` every ``every_s``
    in a thread, from ``__enter__`` until ``__exit__`` (a failover that flaps, a pooler that
    restarts in a loop). ``ended`` collects every session it ended.

    While it runs, the harness's own connections to the database die too: read rows after
    the ``with`` block.
    """

    def __init__(self, database_url: str, *, every_s: float = 0.02) -> None:
        self.database_url = database_url
        self.every_s = every_s
        self.ended: list[Backend] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="terminate-backends", daemon=True)
        self._error: BaseException | None = None

    def _loop(self) -> None:
        try:
            while True:
                self.ended.extend(terminate_backends(self.database_url))
                self.rounds += 1
                if self._stop.wait(self.every_s):
                    return
        except BaseException as exc:  # surfaced by __exit__, in the test's thread
            self._error = exc

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._error is not None and exc is None:
            raise self._error


# -- the broker ------------------------------------------------------------------------------


def _queue_entity(name: str) -> Any:
    # Declared the way Celery declares a missing queue (a direct exchange of the same name).
    entity: Any = kombu.entity  # kombu's Queue and Exchange are untyped
    return entity.Queue(name, entity.Exchange(name, type="direct"), routing_key=name)


def _connection(broker_url: str) -> Any:
    kombu_connection: Any = kombu.connection  # kombu is untyped
    return kombu_connection.Connection(broker_url, connect_timeout=5)


def queued_messages(broker_url: str, queue: str) -> int:
    """How many messages wait in ``queue`` (not counting the ones a worker holds unacked)."""
    with _connection(broker_url) as conn:
        try:
            declared = conn.default_channel.queue_declare(queue=queue, passive=True)
        except conn.channel_errors:
            # NOT_FOUND: on Redis an empty queue is a list that does not exist.
            return 0
        return int(declared.message_count)


def _unacked(client: redis.Redis) -> dict[bytes | str, list[Any]]:
    """kombu's ``unacked`` hash: delivery tag to ``[message, exchange, routing_key]``."""
    return {tag: json.loads(raw) for tag, raw in client.hgetall("unacked").items()}


def _redis_client(broker_url: str) -> redis.Redis:
    return redis.Redis.from_url(broker_url, socket_connect_timeout=5, socket_timeout=5)


def message_in_redis(broker_url: str, queue: str, task_id: str) -> bool:
    """Whether a message of task ``task_id`` is anywhere kombu's Redis transport keeps one:
    waiting in ``queue``'s list, or delivered and unacknowledged in the ``unacked`` hash."""
    client = _redis_client(broker_url)
    try:
        waiting = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
        held = [entry[0] for entry in _unacked(client).values()]
    finally:
        client.close()
    return any((m.get("headers") or {}).get("id") == task_id for m in waiting + held)


def unacked_messages(broker_url: str, queue: str) -> int:
    """How many messages of ``queue`` a consumer took and has not acknowledged (Redis only).

    kombu's Redis transport keeps each delivered, unacknowledged message in the ``unacked``
    hash (as ``[message, exchange, routing_key]``) until its ack; a message still there after
    its worker died is what the visibility timeout redelivers.
    """
    client = _redis_client(broker_url)
    try:
        entries = _unacked(client)
    finally:
        client.close()
    return sum(1 for entry in entries.values() if entry[2] == queue)


def forget_unacked(broker_url: str, queues: Iterable[str]) -> int:
    """Drop the unacknowledged messages of ``queues`` from kombu's Redis tables; how many.

    Only for queues whose workers are gone: it is what their acks would have done.
    """
    names = set(queues)
    client = _redis_client(broker_url)
    try:
        tags = [tag for tag, entry in _unacked(client).items() if entry[2] in names]
        if tags:
            pipe = client.pipeline()
            pipe.hdel("unacked", *tags)
            pipe.zrem("unacked_index", *tags)
            pipe.execute()
    except Exception:  # cleanup never hides what happened before it
        logger.warning("could not forget the unacked messages of %s", sorted(names), exc_info=True)
        return 0
    finally:
        client.close()
    return len(tags)


def wait_acknowledged(broker_url: str, queue: str, *, timeout: float = 10.0) -> None:
    """Wait until no message of ``queue`` is left unacknowledged (nothing to redeliver later).

    Celery logs a task's end before the main process sends the ack, hence a wait.
    """
    wait_for(
        lambda: True if unacked_messages(broker_url, queue) == 0 else None,
        timeout=timeout,
        what=f"every message of {queue} acknowledged",
        describe=lambda: f"{unacked_messages(broker_url, queue)} unacknowledged",
    )


def delete_queue(broker_url: str, queue: str) -> None:
    """Delete ``queue`` and its exchange from the broker; best effort, logged."""
    try:
        with _connection(broker_url) as conn:
            bound = _queue_entity(queue)(conn.default_channel)
            # kombu's virtual transports (Redis) only delete bindings this channel declared.
            bound.declare()
            bound.delete()
            bound.exchange.delete()
    except Exception:  # cleanup never hides what happened before it
        logger.warning("could not delete queue %s", queue, exc_info=True)


# -- workers ---------------------------------------------------------------------------------


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


# -- the invariant ---------------------------------------------------------------------------


def _unique_key(table: Any) -> tuple[str, ...]:
    for constraint in table.constraints:
        if isinstance(constraint, UniqueConstraint):
            return tuple(column.name for column in constraint.columns)
    raise TypeError(f"{table.name} has no unique constraint")  # pragma: no cover


def _domain_tables() -> dict[str, tuple[str, ...]]:
    tables: dict[str, tuple[str, ...]] = {}
    for model in (FrontendPrice, Stock):
        table = model.__table__
        assert isinstance(table, Table)
        tables[table.name] = _unique_key(table)
    return tables


# Each domain table and its business key, read from the models so the check follows them.
DOMAIN_KEYS: Final = _domain_tables()


class FaultInvariantError(CheckFailed):
    """What a fault left behind that it must not: the message lists every problem."""


@dataclass(frozen=True)
class FaultReport:
    """What :func:`assert_fault_invariants` found when everything held."""

    runs: list[RunRow]
    recovered: list[int]
    provoked_tracebacks: list[str]


def _compile(patterns: Iterable[str | re.Pattern[str]]) -> list[re.Pattern[str]]:
    return [p if isinstance(p, re.Pattern) else re.compile(p) for p in patterns]


def assert_fault_invariants(
    store: RunStore,
    worker_log_lines: Sequence[LogLine],
    *,
    provoked: Sequence[str | re.Pattern[str]] = (),
    expected_rows: Mapping[RowsKey, int],
    run_ids: Iterable[int] | None = None,
) -> FaultReport:
    """The invariant after every fault scenario; FaultInvariantError listing what broke.

    - Every run in scope (``run_ids``; default: every row of ``ingest_runs``) is terminal:
      ``success``, or ``failed`` by the task or by ``unlock_stale_runs`` (those are reported as
      ``recovered``). None is left ``queued`` or ``running``.
    - No domain row is duplicated on its business key (the unique constraints guarantee it
      today; this catches one that is dropped), and each domain table holds exactly
      ``expected_rows`` rows per (table, project, marketplace), no more, no fewer and none
      anywhere else: what the successful runs were served, and nothing from a failed one.
    - ``harness.core.logs.tracebacks(worker_log_lines)`` has nothing but the provoked ones:
      ``provoked`` are regular expressions; a traceback matching one of them is expected.
    """
    problems: list[str] = []
    if run_ids is None:
        with store.engine.connect() as conn:
            ids = [
                int(i)
                for i in conn.execute(text("SELECT id FROM ingest_runs ORDER BY id")).scalars()
            ]
    else:
        ids = sorted(set(run_ids))
    runs: list[RunRow] = []
    for run_id in ids:
        row = store.get(run_id)
        if row is None:
            problems.append(f"run {run_id}: no such row")
            continue
        runs.append(row)
        if not row.terminal:
            problems.append(
                f"run {run_id} is left {row.status!r} (heartbeat {row.heartbeat_at}, started "
                f"{row.started_at}): neither finished nor recovered by unlock_stale_runs"
            )
    recovered = [
        r.id
        for r in runs
        if r.status == "failed" and (r.error_message or "").startswith(MESSAGE_PREFIX)
    ]

    with store.engine.connect() as conn:
        for table, key in DOMAIN_KEYS.items():
            columns = ", ".join(key)
            duplicates = conn.execute(
                text(
                    f"SELECT {columns}, count(*) FROM {table} GROUP BY {columns} "
                    "HAVING count(*) > 1 ORDER BY count(*) DESC LIMIT 5"
                )
            ).all()
            for dup in duplicates:
                problems.append(f"{table}: {tuple(dup)[:-1]} is stored {dup[-1]} times")
            counts = {
                (table, int(p), str(m)): int(n)
                for p, m, n in conn.execute(
                    text(
                        f"SELECT project_id, marketplace_code, count(*) FROM {table} "
                        "GROUP BY project_id, marketplace_code"
                    )
                )
            }
            wanted = {k: n for k, n in expected_rows.items() if k[0] == table and n}
            for k in sorted(set(counts) | set(wanted)):
                got, want = counts.get(k, 0), wanted.get(k, 0)
                if got != want:
                    problems.append(
                        f"{table} for project {k[1]}, marketplace {k[2]}: {got} rows, expected "
                        f"{want} (what the successful runs were served; 0 after a failed run)"
                    )
    unknown = {k[0] for k in expected_rows} - set(DOMAIN_KEYS)
    if unknown:
        problems.append(f"expected_rows names unknown tables {sorted(unknown)}")

    patterns = _compile(provoked)
    allowed: list[str] = []
    for block in tracebacks(worker_log_lines):
        if any(p.search(block) for p in patterns):
            allowed.append(block)
        else:
            problems.append("an unhandled traceback in a worker log:\n" + _indent(block))

    if problems:
        rows = "\n".join(f"    {r.as_dict()!r}" for r in runs) or "    (no run)"
        raise FaultInvariantError(
            "the fault left behind what it must not:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\n  runs in scope:\n{rows}"
        )
    return FaultReport(runs=runs, recovered=recovered, provoked_tracebacks=allowed)


def _indent(block: str) -> str:
    return "\n".join(f"      {line}" for line in block.splitlines())
