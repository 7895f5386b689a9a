"""The session's Celery workers: one per (pool, broker), started on first use, stopped together.

Plain classes (no pytest): ``WorkerFarm.worker("prefork", "redis")`` returns a ready
:class:`~harness.workers.process.CeleryWorkerProcess` that serves every loop mode (the mode travels
in each task message), so the whole matrix costs one worker start per pool and broker, not one per
cell. A worker that died since its last use is replaced, and the death is recorded.
:class:`WorkerRuns` is one scenario's view of a worker: it creates runs, sends them in a loop
mode, waits until each is terminal and its log lines are written, and reads only the log that
was written since the scenario began.

Exceptions::

    Exception
     ├── BrokerUnavailable   the cell's broker has no URL here (no AMQP broker answers):
     │                       a reason to skip the cell, not a failure
     └── BrokerUnreachable   the cell's broker has a URL (HARNESS_AMQP_URL) that does not
                             answer: a failure, found in a second rather than after a worker's
                             20-45 s ping timeout
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from harness.core.cell import BROKERS, POOLS, RUNNERS
from harness.core.errors import CheckFailed, SetupError
from harness.core.logs import (
    LOOP_MODE_TEMPLATE,
    LogLine,
    harness_lines,
    promised_end,
    trace_lines,
)
from harness.core.runs import RunNotTerminalError, RunRow, RunStore
from harness.services import Services, mask_dsn
from harness.workers.forkserver import ForkServer
from harness.workers.jobfaults import JOB_FAULT_HEADER, JobFault, parse_job_fault
from harness.workers.loopmodes import HEADER_SOURCE
from harness.workers.process import CeleryWorkerProcess, app_env, mask_secrets

__all__ = [
    "CONCURRENCY",
    "HTTP_RETRY_BACKOFF_S",
    "WARMUP_CODE_PREFIX",
    "WARMUP_PROJECT_ID",
    "BrokerUnavailable",
    "BrokerUnreachable",
    "CompletedRun",
    "SentRun",
    "WorkerDeath",
    "WorkerFarm",
    "WorkerRuns",
]

logger = logging.getLogger("harness.farm")

# Enough for the pool to be itself (prefork forks children, threads and gevent run several
# tasks side by side), small enough for a 2-core machine running two xdist workers.
CONCURRENCY: Final[Mapping[str, int]] = {"prefork": 2, "solo": 1, "threads": 4, "gevent": 8}
# A failing run retries the marketplace twice, 1 ms then 2 ms apart: the "keeps failing past
# the retries" scenario checks the attempts, the status and the lines, not the backoff's
# length, and then costs about what a successful run does (with the service's default of
# 0.2 s it took 0.6 s; at 10 ms, 30 ms of every failing run was sleep).
_HTTP_RETRIES: Final = "2"
HTTP_RETRY_BACKOFF_S: Final = "0.001"
_STOP_TIMEOUT_S: Final = 10.0

# The warm-up runs' rows: a project and marketplace codes no scenario uses.
WARMUP_PROJECT_ID: Final = 0
WARMUP_CODE_PREFIX: Final = "harness-warmup-"
_EVIDENCE_LOG_LINES: Final = 80


class BrokerUnavailable(SetupError):
    """The cell's broker cannot be used here; ``reason`` says why and what to set."""

    def __init__(self, broker: str, reason: str) -> None:
        super().__init__(f"broker {broker}: {reason}")
        self.broker = broker
        self.reason = reason


class BrokerUnreachable(SetupError):
    """The cell's broker has a URL, and nothing answers there; the message names the fix."""


_AMQP_PROBE_TIMEOUT_S: Final = 1.0


def probe_amqp(url: str, *, timeout: float = _AMQP_PROBE_TIMEOUT_S) -> str | None:
    """None if an AMQP broker accepts a connection (and our login) at ``url``; else why not."""
    from kombu.connection import Connection

    connection: Any = Connection(url, connect_timeout=timeout)  # type: ignore[no-untyped-call]
    try:
        connection.ensure_connection(max_retries=0, timeout=timeout)  # one try, no retry
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        connection.release()
    return None


@dataclass(frozen=True)
class WorkerDeath:
    """A worker found dead when it was next needed (and then replaced)."""

    pool: str
    broker: str
    node_name: str
    returncode: int | None
    log_path: Path

    def describe(self) -> str:
        how = (
            f"killed by signal {-self.returncode}"
            if self.returncode is not None and self.returncode < 0
            else f"exit code {self.returncode}"
        )
        return (
            f"worker {self.node_name} ({self.pool}/{self.broker}) had died ({how}); "
            f"restarted. Its log: {self.log_path}"
        )


class WorkerFarm:
    """Lazily started, cached workers for one session; ``stop_all()`` ends them all.

    ``runner`` goes to every worker as ``HARNESS_RUNNER`` (``prefix`` puts the pre-fix
    ``asyncio.run()`` in place of ``run_async_safe``); ``warm_up`` runs a throwaway run in
    each new worker process before handing it out (see :meth:`_warm_up`).

    Workers are spawned by the farm's own spawner threads, which live until ``stop_all()``:
    Linux's parent-death signal, which kills a worker when the test process dies, fires when
    the spawning *thread* ends, so no worker may be spawned by a short-lived thread. With them,
    ``prestart()`` boots several workers side by side (a boot is ~0.5-1 s, mostly imports).
    The farm itself is used from one thread (the session's).
    """

    def __init__(
        self,
        services: Services,
        *,
        marketplace_url: str,
        database_url: str,
        log_dir: Path,
        runner: str = "fixed",
        warm_up: bool = True,
        fork_server: ForkServer | None = None,
    ) -> None:
        if runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
        self.services = services
        self.marketplace_url = marketplace_url
        self.database_url = database_url
        self.log_dir = log_dir
        self.runner = runner
        self.warm_up = warm_up
        # The farm's workers of the solo, threads and prefork pools are forked from it; the
        # farm stops it in stop_all(), after them.
        self.fork_server = fork_server
        self.deaths: list[WorkerDeath] = []
        self._workers: dict[tuple[str, str], CeleryWorkerProcess] = {}
        # Workers prestart() began and no worker() call has taken yet.
        self._booting: dict[tuple[str, str], Future[CeleryWorkerProcess]] = {}
        self._store: RunStore | None = None
        self._spawner: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # Every worker a spawner thread started, also one whose caller stopped waiting for it
        # (an interrupt): stop_all() stops them all.
        self._started: list[CeleryWorkerProcess] = []
        # The AMQP probe's verdict, once: "" when the broker answered, else why not.
        self._amqp_problem: str | None = None

    def __repr__(self) -> str:
        running = ", ".join(f"{p}/{b}" for p, b in self._workers) or "none"
        return f"<WorkerFarm runner={self.runner} workers: {running}>"

    def broker_url(self, broker: str) -> str:
        """The URL of ``broker``; BrokerUnavailable when this machine has none."""
        if broker == "redis":
            return self.services.redis_url
        if broker == "amqp":
            url = self.services.amqp_url
            if url is None:
                raise BrokerUnavailable(broker, "no AMQP broker answers; set HARNESS_AMQP_URL")
            if self._amqp_problem is None:
                self._amqp_problem = probe_amqp(url) or ""
            if self._amqp_problem:
                raise BrokerUnreachable(
                    f"the AMQP broker at {mask_dsn(url)} does not answer: {self._amqp_problem}. "
                    "Fix: start it, or correct HARNESS_AMQP_URL (amqp://USER:PASSWORD@HOST:5672//)"
                    ", or leave out the amqp cells (--broker=redis)"
                )
            return url
        raise ValueError(f"unknown broker {broker!r}; known: {', '.join(BROKERS)}")

    def worker(self, pool: str, broker: str) -> CeleryWorkerProcess:
        """The running worker for (``pool``, ``broker``), started now if needed."""
        key = self._check(pool, broker)
        current = self._alive(key)
        if current is not None:
            return current
        booting = self._booting.pop(key, None)
        if booting is not None:
            try:
                worker = booting.result()
            except Exception as exc:  # started again below, so the caller sees the error
                logger.warning("farm: starting the %s/%s worker failed: %s", *key, exc)
            else:
                self._workers[key] = worker
                return worker
        worker = self._submit(pool, broker).result()
        self._workers[key] = worker
        return worker

    def prestart(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Begin starting the workers for ``pairs``, in that order, and return at once.

        They boot on the farm's spawner threads, as many at a time as there are cores: with
        ``pairs`` in the order the tests need them, the first worker is ready sooner than if
        all booted at once on shared cores, and the later ones boot while the first one's
        tests run. ``worker()`` waits for the one it is asked for. Best effort: a pair whose
        broker is missing is only logged, and a worker that fails to start is started again
        by ``worker()``, whose caller then sees the error.
        """
        for pool, broker in dict.fromkeys(pairs):
            key = self._check(pool, broker)
            if self._alive(key) is not None:
                continue
            try:
                self.broker_url(broker)
            except BrokerUnavailable as exc:
                logger.info("farm: not starting %s/%s: %s", pool, broker, exc.reason)
                continue
            except BrokerUnreachable as exc:  # worker() raises it in each of the cell's tests
                logger.warning("farm: not starting %s/%s: %s", pool, broker, exc)
                continue
            if key not in self._booting:
                self._booting[key] = self._submit(pool, broker)

    def _check(self, pool: str, broker: str) -> tuple[str, str]:
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; known: {', '.join(POOLS)}")
        if broker not in BROKERS:
            raise ValueError(f"unknown broker {broker!r}; known: {', '.join(BROKERS)}")
        return (pool, broker)

    def _alive(self, key: tuple[str, str]) -> CeleryWorkerProcess | None:
        """The cached worker if it is alive; a dead one is recorded, cleaned up and forgotten."""
        current = self._workers.get(key)
        if current is None or current.is_alive():
            return current
        death = WorkerDeath(*key, current.node_name, current.returncode, current.log_path)
        self.deaths.append(death)
        logger.warning("%s", death.describe())
        del self._workers[key]
        self._stop_one(current)  # reaps it and kills anything left of its group
        return None

    def _submit(self, pool: str, broker: str) -> Future[CeleryWorkerProcess]:
        # The broker URL is resolved here, so a missing broker raises in the caller's thread.
        broker_url = self.broker_url(broker)
        if self._spawner is None:
            # A boot is CPU-bound (imports): more at once than cores only slows each.
            self._spawner = ThreadPoolExecutor(
                max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="farm-spawner"
            )
        return self._spawner.submit(self._start, pool, broker, broker_url)

    def _start(self, pool: str, broker: str, broker_url: str) -> CeleryWorkerProcess:
        """Start and warm up one worker (in a spawner thread)."""
        worker = CeleryWorkerProcess(
            env=app_env(
                database_url=self.database_url,
                broker_url=broker_url,
                marketplace_url=self.marketplace_url,
                APP_HTTP_RETRIES=_HTTP_RETRIES,
                APP_HTTP_RETRY_BACKOFF_S=HTTP_RETRY_BACKOFF_S,
            ),
            log_dir=self.log_dir,
            pool=pool,
            concurrency=CONCURRENCY[pool],
            extra_env={"HARNESS_RUNNER": self.runner},
            fork_server=self.fork_server,
        )
        worker.start()
        with self._lock:
            self._started.append(worker)
        try:
            warm_s = self._warm_up(worker) if self.warm_up else 0.0
        except BaseException:
            self._stop_one(worker)
            raise
        logger.info(
            "farm: %s/%s worker %s on %s ready in %.2f s, warmed up in %.2f s",
            pool,
            broker,
            worker.node_name,
            mask_dsn(worker.broker_url),
            worker.start_s or 0.0,
            warm_s,
        )
        return worker

    def _warm_up(self, worker: CeleryWorkerProcess) -> float:
        """Run one throwaway run per pool process before the worker is handed out.

        A process's first run imports what the service loads lazily (the job modules, httpx,
        asyncpg, the SSL trust store): 150-300 ms that belong to the process, not to the first
        scenario that happens to use it. Prefork gets one run per child (sent together, so the
        fair scheduler gives each child one); the other pools share one process. The runs
        use project 0 and marketplace codes of their own (one per worker and run: workers
        warm up side by side, and a code may have one active run at a time); a warm-up
        that does not succeed is only logged (the scenarios then show what is wrong).

        The runs hold off the tests' table resets (``RunStore.no_reset``) until they end: a
        test that empties the table meanwhile would delete a warm-up's row under it, and
        restart the ids that the warm-up's row still holds.
        """
        started = time.monotonic()
        store = self._warm_up_store()
        runs = WorkerRuns(worker, store)
        slots = worker.concurrency if worker.pool == "prefork" else 1
        with store.no_reset():
            sent = [
                runs.send(
                    "no_loop",
                    marketplace_code=f"{WARMUP_CODE_PREFIX}{worker.queue}-{i}",
                    project_id=WARMUP_PROJECT_ID,
                )
                for i in range(slots)
            ]
            done_runs = [runs.wait(one) for one in sent]
        for done in done_runs:
            if done.row.status != "success":
                logger.warning(
                    "farm: warm-up run %d on %s ended %s: %s",
                    done.run_id,
                    worker.node_name,
                    done.row.status,
                    done.row.error_message,
                )
        return time.monotonic() - started

    def _warm_up_store(self) -> RunStore:
        with self._lock:  # spawner threads start and warm up side by side
            if self._store is None:
                self._store = RunStore(self.database_url)
            return self._store

    def deaths_of(self, pool: str, broker: str) -> list[WorkerDeath]:
        return [d for d in self.deaths if (d.pool, d.broker) == (pool, broker)]

    def workers(self) -> dict[tuple[str, str], CeleryWorkerProcess]:
        """The workers started so far, by (pool, broker)."""
        return dict(self._workers)

    def stop_all(self) -> None:
        """Stop every worker: at once if idle, else warm, then kill. Best effort, never raises.

        The workers stop side by side: a prefork warm shutdown alone takes ~1.7 s, and the
        session should not wait for each in turn.
        """
        self._workers.clear()
        # Boots not begun are dropped; those under way finish first, so that they are stopped
        # with the rest (the spawner threads must stay alive until then: see the class doc).
        booting, self._booting = list(self._booting.values()), {}
        for future in booting:
            future.cancel()
        for future in booting:
            if not future.cancelled():
                with contextlib.suppress(Exception):  # its caller would have seen it
                    future.result()
        with self._lock:
            workers, self._started = self._started, []
        try:
            self._stop_many(workers)
        finally:
            # Only now: a worker's parent-death signal is tied to its spawner thread, so this
            # also kills whatever a failed stop left alive.
            spawner, self._spawner = self._spawner, None
            if spawner is not None:
                spawner.shutdown(wait=True, cancel_futures=True)
            store, self._store = self._store, None
            if store is not None:
                store.close()
            # Last: a forked worker dies with its server, so a failed stop leaves nothing.
            server, self.fork_server = self.fork_server, None
            if server is not None:
                server.stop()

    def _stop_many(self, workers: list[CeleryWorkerProcess]) -> None:
        if not workers:
            return
        started = time.monotonic()
        threads = [
            threading.Thread(target=self._stop_one, args=(w,), name=f"stop-{w.node_name}")
            for w in workers[1:]
        ]
        for thread in threads:
            thread.start()
        self._stop_one(workers[0])
        for thread in threads:
            thread.join()
        logger.info(
            "farm: stopped %d worker(s) in %.2f s", len(workers), time.monotonic() - started
        )

    @staticmethod
    def _stop_one(worker: CeleryWorkerProcess) -> None:
        try:
            # At the farm's end no scenario sends any more: an idle worker is killed at once.
            worker.stop(timeout=_STOP_TIMEOUT_S, kill_if_idle=True)
        except Exception:
            logger.exception("farm: stopping %s failed; killing its process group", worker)
            try:
                worker.kill()
            except Exception:
                logger.exception("farm: killing %s failed", worker)


@dataclass(frozen=True)
class SentRun:
    """A run that was created and sent to the worker."""

    run_id: int
    task_id: str
    loop_mode: str


@dataclass(frozen=True)
class CompletedRun:
    """A terminal run: its row (read on the harness's connection) and the scenario's log."""

    row: RunRow
    lines: list[LogLine]
    loop_mode: str
    task_id: str

    @property
    def run_id(self) -> int:
        return int(self.row.id)


class WorkerRuns:
    """One scenario's runs on one worker; the log is read from a mark taken at construction.

    Run ids restart whenever a test truncates ``ingest_runs``, so an earlier scenario's
    ``Starting run 1`` may be in the same log file: reading from the mark means a scenario sees
    only its own lines (and the assertions still select by run id).
    """

    def __init__(self, worker: CeleryWorkerProcess, store: RunStore) -> None:
        self.worker = worker
        self.store = store
        self.mark = worker.log_mark()
        self.sent: list[SentRun] = []

    def send(
        self,
        loop_mode: str,
        *,
        marketplace_code: str,
        project_id: int = 1,
        job_code: str = "frontend_prices",
        job_fault: JobFault | str | None = None,
    ) -> SentRun:
        """Create a queued run, as the API does, and send ``execute_ingest`` in ``loop_mode``;
        with ``job_fault``, its job raises that fault from inside (harness.workers.jobfaults)."""
        run_id = self.store.create(
            project_id=project_id, marketplace_code=marketplace_code, job_code=job_code
        )
        headers = {} if job_fault is None else {JOB_FAULT_HEADER: parse_job_fault(job_fault).value}
        task_id = self.worker.send(run_id, loop_mode=loop_mode, headers=headers)
        sent = SentRun(run_id, task_id, loop_mode)
        self.sent.append(sent)
        return sent

    def wait(self, sent: SentRun, *, timeout: float = 20.0) -> CompletedRun:
        """Wait until Celery logged the task's end, then read the row once.

        The task commits the row's terminal state before Celery writes its "succeeded" line,
        so by then the row is final; waiting on the log file (not polling the table) keeps
        the harness's own load off the two cores the worker and Postgres need. A worker that
        exits meanwhile fails the wait at once, with its exit code and log tail.
        """
        deadline = time.monotonic() + timeout
        # The task's own end line promises a committed row: read it the moment the line is
        # there, once, with no waiting. A task that logged first and committed after fails.
        lines = self.worker.wait_for_log(
            lambda lines: (
                promised_end(lines, sent.run_id) is not None
                or bool(trace_lines(lines, sent.task_id))
            ),
            since=self.mark,
            timeout=timeout,
            what=f"the end of run {sent.run_id} (task {sent.task_id})",
        )
        promised = promised_end(lines, sent.run_id)
        if promised is not None:
            at_the_line = self.store.get(sent.run_id)
            if at_the_line is None or at_the_line.status != promised:
                state = "no row" if at_the_line is None else f"status {at_the_line.status!r}"
                raise RunNotTerminalError(
                    f"the worker logged run {sent.run_id}'s end ({promised}), but its row, "
                    f"read at that moment, has {state}: the line came before the commit",
                    at_the_line,
                )
        lines = self.worker.wait_for_task(
            sent.task_id, since=self.mark, timeout=max(0.0, deadline - time.monotonic())
        )
        self._check_mode_forced(sent, lines)
        row = self.store.get(sent.run_id)
        if row is None or not row.terminal:
            state = "no such row" if row is None else f"status {row.status!r}"
            raise RunNotTerminalError(
                f"task {sent.task_id} ended but run {sent.run_id} is not terminal ({state}): "
                "the task returned without finishing its row; see the worker log below",
                row,
            )
        return CompletedRun(row=row, lines=lines, loop_mode=sent.loop_mode, task_id=sent.task_id)

    def _check_mode_forced(self, sent: SentRun, lines: list[LogLine]) -> None:
        """The shim says it forced the mode the run was sent in: a run that ran in another mode
        (a worker without the shim, a header lost on the way) proves nothing about its cell."""
        want = LOOP_MODE_TEMPLATE.format(
            run_id=sent.run_id, mode=sent.loop_mode, source=HEADER_SOURCE
        )
        said = [line.headline for line in harness_lines(lines, sent.run_id)]
        if want not in said:
            raise CheckFailed(
                f"run {sent.run_id} was sent in {sent.loop_mode} but the worker's shim did not "
                f"say it forced that mode: want {want!r}, the shim said {said}"
            )

    def run(
        self,
        loop_mode: str,
        *,
        marketplace_code: str,
        project_id: int = 1,
        job_code: str = "frontend_prices",
        timeout: float = 20.0,
    ) -> CompletedRun:
        """``send`` then ``wait``."""
        sent = self.send(
            loop_mode, marketplace_code=marketplace_code, project_id=project_id, job_code=job_code
        )
        return self.wait(sent, timeout=timeout)

    def lines(self) -> list[LogLine]:
        """The worker's log since the scenario began."""
        return self.worker.log_lines(self.mark)

    def rows_text(self) -> str:
        """Every run of the scenario as stored now, one column per line (for a failure)."""
        if not self.sent:
            return "(the scenario created no run)"
        blocks = []
        for sent in self.sent:
            row = self.store.get(sent.run_id)
            head = f"run {sent.run_id} ({sent.loop_mode}, task {sent.task_id}):"
            if row is None:
                blocks.append(f"{head} no row")
                continue
            fields = "\n".join(f"  {k} = {v!r}" for k, v in row.as_dict().items())
            blocks.append(f"{head}\n{fields}")
        return "\n".join(blocks)

    def log_text(self, limit: int = _EVIDENCE_LOG_LINES) -> str:
        """The last ``limit`` lines the worker wrote since the scenario began (for a failure)."""
        text = self.worker.read_log(self.mark).splitlines()
        shown = text[-limit:]
        skipped = f"... {len(text) - len(shown)} earlier lines in {self.worker.log_path}\n"
        return (skipped if len(text) > len(shown) else "") + "\n".join(
            mask_secrets(line) for line in shown
        )
