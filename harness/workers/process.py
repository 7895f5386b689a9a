"""A real ``celery worker`` process for tests: spawn, ready on a control ping, log file, stop, kill.

Each worker gets its own queue and node name (xdist-safe), the service URLs in its environment
and its log (Celery's log file plus anything the process printed) in one file. It runs in its
own process group, so stopping or killing it also reaches prefork's children, and it dies with
the test process if that dies abruptly: the harness arms Linux's parent-death signal (SIGKILL)
in the main worker, and Celery arms it in each prefork child.

Exceptions::

    RuntimeError
     └── WorkerStartError   the worker exited, or did not answer a ping before the deadline;
                            carries the command (passwords masked), exit code and log tail
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol, Self

import kombu.entity
import psutil
from celery import Celery

from harness._deathsig import PR_SET_PDEATHSIG, load_prctl
from harness.core import stacks
from harness.core._lifecycle import StartStop
from harness.core.errors import SetupError
from harness.core.logs import LogLine, read_log_file, trace_lines
from harness.core.pythons import WORKER_PYTHON_ENV
from harness.core.target import TARGET_ENV, default_target, default_target_spec, load_target
from harness.workers._forkserver import exit_status
from harness.workers.forkserver import (
    FORK_SERVER_ENV,
    ForkedChild,
    ForkServer,
    ForkServerError,
    worker_environment,
)
from harness.workers.loopmodes import LOOP_MODE_HEADER, POOL_ENV, LoopMode, parse_loop_mode
from harness.workers.stackdump import STACKS_FILE_ENV, take_stacks

__all__ = [
    "CeleryWorkerProcess",
    "WorkerStartError",
    "app_env",
    "mask_secrets",
]

logger = logging.getLogger("harness.worker")

LOG_TAIL_LINES: Final = 30
_URL_PASSWORD_RE: Final = re.compile(r"(://[^\s:/@]*):[^\s@]*@")
_EXIT_POLL_S: Final = 0.005
# A ready worker answers a ping within a few ms; short pings find it soon after it is up.
_READY_PING_TIMEOUT_S: Final = 0.05
_CLIENT_POLL_S: Final = 0.01
_LOG_POLL_S: Final = 0.01
_KILL_WAIT_S: Final = 5.0
_IDLE_CHECK_TIMEOUT_S: Final = 0.5
_NOT_FOUND: Final = 404  # AMQP's reply code, which kombu's Redis transport uses too


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    For free text (a command line, log lines); a single URL is ``harness.services.mask_dsn``'s.
    """
    return _URL_PASSWORD_RE.sub(r"\1:***@", text)


def app_env(
    *, database_url: str, broker_url: str, marketplace_url: str, **overrides: str
) -> dict[str, str]:
    """The default Target's environment for a test worker (``Target.app_env``): its URLs and
    quick settings, the marketplace source's URL (``Target.upstream_url_env``), ``overrides``.
    """
    target = default_target()
    upstream = {target.upstream_url_env: marketplace_url} if target.upstream_url_env else {}
    return target.app_env(database_url=database_url, broker_url=broker_url, **upstream, **overrides)


def _xdist_worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def _safe_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class _Child(Protocol):
    """The worker's main process as this module handles it: a ``Popen`` child of ours, or a
    child the fork server forked (:class:`~harness.workers.forkserver.ForkedChild`)."""

    pid: int

    @property
    def returncode(self) -> int | None:
        """Set once reaped: from then on its pid is not ours to signal."""

    def peek(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class _PopenChild:
    """A ``Popen`` child as a :class:`_Child`."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def peek(self) -> int | None:
        # Never reaps (WNOWAIT): while the exited main process is a zombie its pid, and so the
        # process group id, cannot be reused, so killpg() cannot hit a stranger's group.
        proc = self.proc
        if proc.returncode is not None:
            return proc.returncode
        try:
            return exit_status(proc.pid, reap=False)
        except ChildProcessError:
            return proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)


class WorkerStartError(SetupError):
    """The worker did not become ready: the message has the command, exit code and log tail."""

    def __init__(
        self, message: str, *, command: str, returncode: int | None, log_tail: list[str]
    ) -> None:
        super().__init__(message)
        self.command = command
        self.returncode = returncode
        self.log_tail = log_tail


class CeleryWorkerProcess(StartStop):
    """One ``celery worker`` process, started once; a context manager.

    ``env`` holds the service's settings (``APP_DATABASE_URL``, ``APP_BROKER_URL``,
    ``APP_MARKETPLACE_URL`` ...; see :func:`app_env`); ``extra_env`` adds anything else (e.g.
    ``HARNESS_RUNNER``). The harness's own environment is passed on without its ``APP_*``,
    ``HARNESS_*`` and ``CELERY_*`` variables.

    ``start_s`` and ``stop_s`` record how long start (spawn until the ping answered) and stop
    took.

    Start it from a thread that outlives it (pytest's main thread does): Linux sends the
    parent-death signal when the *thread* that forked the worker exits, not only the process.
    Stopping or killing it from any thread is fine.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        log_dir: Path,
        pool: str = "solo",
        concurrency: int = 1,
        queue: str | None = None,
        node_name: str | None = None,
        loglevel: str = "INFO",
        extra_env: Mapping[str, str] | None = None,
        app: str = "harness.workers.worker_app",
        start_timeout: float = 20.0,
        target: str | None = None,
        fork_server: ForkServer | None = None,
    ) -> None:
        self.target_spec = target or default_target_spec()
        self.target = load_target(self.target_spec)
        broker_url = env.get(self.target.broker_url_env)
        if not broker_url:
            raise ValueError(
                f"env must contain {self.target.broker_url_env}: the worker and the harness's "
                "pings and task messages must use the same broker (see Target.app_env)"
            )
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.broker_url = broker_url
        self.pool = pool
        self.concurrency = concurrency
        self.queue = queue or f"harness-{_xdist_worker()}-{uuid.uuid4().hex[:8]}"
        # A queue of our own is deleted once the worker is gone; one passed in may be shared.
        self._owns_queue = queue is None
        # An explicit host part: the ping's destination must be the name the worker reports.
        name = node_name or f"{self.queue}@{socket.gethostname()}"
        self.node_name = name if "@" in name else f"{name}@{socket.gethostname()}"
        if "%" in self.node_name:
            from celery.utils.nodenames import host_format

            self.node_name = host_format(self.node_name)
        self.loglevel = loglevel
        self.app = app
        self.start_timeout = start_timeout
        self.log_path = Path(log_dir).resolve() / f"worker-{_safe_file_name(self.node_name)}.log"
        # The interpreter: this one, or the venv --python built (harness.core.pythons).
        python = os.environ.get(WORKER_PYTHON_ENV) or sys.executable
        self.command: list[str] = [
            python, "-m", "celery", "-A", app, "worker",
            "-P", pool, "-c", str(concurrency), "-Q", self.queue, "-n", self.node_name,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", loglevel, "--logfile", str(self.log_path),
        ]  # fmt: skip
        # Where the worker writes its threads' stacks when asked (harness.workers.stackdump).
        self.stacks_path = self.log_path.with_suffix(".stacks")
        self.env = worker_environment(
            env,
            {
                TARGET_ENV: self.target_spec,
                POOL_ENV: pool,
                STACKS_FILE_ENV: str(self.stacks_path),
                **(extra_env or {}),
            },
            drop=self.target.env_prefix,
        )
        # The worker imports the Target, its app and its runner from where this process did (a
        # checkout is not an installed package): also the job modules it imports on first run.
        path = self.target.pythonpath(self.target_spec, self.env.get("PYTHONPATH"))
        if path:
            self.env["PYTHONPATH"] = path
        self.fork_server = fork_server
        # How it was started: "exec" (a new interpreter) or "fork" (from the fork server).
        self.started_by: str | None = None
        self.start_s: float | None = None
        self.stop_s: float | None = None
        self._proc: _Child | None = None
        self._client: Celery | None = None
        self._log_offset = 0
        self._finished = False
        self._stacks_token: int | None = None

    def __repr__(self) -> str:
        state = "not started" if self._proc is None else f"pid {self._proc.pid}"
        return f"<CeleryWorkerProcess {self.node_name} pool={self.pool} {state}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Spawn the worker and return once it answers a control ping; raise WorkerStartError."""
        if self._proc is not None:
            raise RuntimeError(f"{self!r} was already started; use a new one for a new worker")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Append, and read from here on: a reused node name must not lose an earlier log.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = time.monotonic()
        self._proc = self._forked() or self._spawned()
        try:
            self._client = self._make_client()
            self._wait_ready(started)
        except BaseException:
            self._cleanup_after_failed_start()
            raise
        self.start_s = time.monotonic() - started
        # A test that hangs while this worker runs gets the worker's stacks in its report.
        self._stacks_token = stacks.register(
            f"Celery worker {self.node_name} (pool {self.pool})", self.dump_stacks
        )
        logger.info("worker %s ready in %.3f s (pid %d)", self.node_name, self.start_s, self.pid)
        return self

    def _forked(self) -> ForkedChild | None:
        """The worker forked from the fork server, if it has one that can fork this pool."""
        server = self.fork_server
        if server is None or not server.can_fork(python=self.command[0], pool=self.pool):
            return None
        try:
            # argv as after "python -m"; stdout/stderr to the log, as _spawned() does.
            child = server.spawn(
                self.command[2:], env=self.env, cwd=os.getcwd(), log_path=self.log_path
            )
        except ForkServerError as exc:
            logger.warning("worker %s: %s; starting it with exec", self.node_name, exc)
            return None
        self.started_by = "fork"
        return child

    def _spawned(self) -> _PopenChild:
        with self.log_path.open("ab") as out:
            # stdout/stderr go to the log too: an import error is printed before Celery's
            # logging (and its --logfile) exists.
            proc = subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self._child_setup(),
            )
        self.started_by = "exec"
        return _PopenChild(proc)

    @staticmethod
    def _child_setup() -> Callable[[], None]:
        prctl = load_prctl()  # resolved before the fork: the child only makes the call
        parent = os.getpid()

        def setup() -> None:
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)  # the test process died before the death signal was armed

        return setup

    def _make_client(self) -> Celery:
        client = Celery(
            f"harness-client-{self.queue}", broker=self.broker_url, set_as_current=False
        )
        client.conf.update(
            task_serializer="json",
            accept_content=["json"],
            result_backend=None,
            task_ignore_result=True,
            broker_transport_options={
                # Replies are collected by polling the reply queue: kombu's 1 s default would
                # add up to a second to every start.
                "polling_interval": _CLIENT_POLL_S,
                # kombu waits 2 s, then 4 s ... between connection attempts; against a broker
                # that is down, a ping or a send fails after broker_connection_timeout instead.
                "interval_start": 0,
                "interval_step": 0.05,
                "interval_max": 0.1,
            },
            broker_connection_timeout=1.0,
        )
        return client

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.start_timeout
        last_error: BaseException | None = None
        while True:
            code = self._exit_status()
            if code is not None:
                raise self._start_error(
                    f"the worker process exited with code {code} before it answered a ping",
                    "Hint: the log above says why: an app that cannot be imported "
                    f"(-A {self.app}), a bad setting, a missing APP_* variable. Run the command "
                    "with the same environment to see it happen.",
                )
            try:
                if self.ping(timeout=_READY_PING_TIMEOUT_S):
                    return
            except Exception as exc:  # the broker is not reachable (yet); the log will tell
                last_error = exc
                time.sleep(0.05)
            if time.monotonic() >= deadline:
                detail = (
                    f"; last ping error: {mask_secrets(repr(last_error))}" if last_error else ""
                )
                raise self._start_error(
                    f"the worker did not answer a control ping within {self.start_timeout:g} s"
                    f"{detail}",
                    f"Hint: check that the broker at {mask_secrets(self.broker_url)} is up and "
                    "is the one the worker uses (APP_BROKER_URL); if the log shows the worker "
                    "'ready.', the machine is slow: raise start_timeout.",
                )

    def _start_error(self, reason: str, hint: str) -> WorkerStartError:
        code = self._exit_status()
        tail = [mask_secrets(line) for line in self.read_log().splitlines()[-LOG_TAIL_LINES:]]
        command = mask_secrets(" ".join(self.command))
        if self.started_by == "fork" and self.fork_server is not None:
            command += (
                f" (forked by the fork server, pid {self.fork_server.pid}; "
                f"{FORK_SERVER_ENV}=off execs it)"
            )
        shown = "\n".join(f"    {line}" for line in tail) or "    (empty)"
        message = (
            f"Celery worker {self.node_name} (pool {self.pool}) did not start: {reason}\n"
            f"command: {command}\n"
            f"exit code: {code if code is not None else 'none, it was still running (killed)'}\n"
            f"log {self.log_path}, last {len(tail)} lines:\n{shown}\n{hint}"
        )
        return WorkerStartError(message, command=command, returncode=code, log_tail=tail)

    def _cleanup_after_failed_start(self) -> None:
        try:
            self.kill(signal.SIGKILL)
        except Exception:  # never hide the start error
            logger.exception("cleaning up after the failed start of %s", self.node_name)
        finally:
            self._close_client()

    def stop(self, timeout: float = 10.0, *, kill_if_idle: bool = False) -> None:
        """Warm shutdown (SIGTERM) within ``timeout`` s, then SIGKILL to the whole group.

        ``kill_if_idle``: when the worker has nothing to finish (:meth:`idle`), SIGKILL its
        group at once. A warm shutdown of an idle worker only waits: prefork's pool processes
        each sleep 1 s on their way out (billiard) and its shutdown timer 0.5 s, gevent's pool
        ~4.5 s; a cold shutdown (SIGQUIT) takes as long. With no task running, reserved or
        queued there is nothing to lose, and the queue is deleted as after any stop.

        Idempotent; leaves no process of the worker's group behind.
        """
        if self._proc is None or self._finished:
            return
        started = time.monotonic()
        killed = False
        try:
            if kill_if_idle and self._exit_status() is None and self.idle():
                self._signal_group(signal.SIGKILL)
                self._wait_exit(time.monotonic() + _KILL_WAIT_S)
                killed = True
            if self._exit_status() is None:
                os.kill(self._proc.pid, signal.SIGTERM)
                if not self._wait_exit(started + timeout):
                    logger.warning(
                        "worker %s did not finish its warm shutdown within %g s; killing its "
                        "process group",
                        self.node_name,
                        timeout,
                    )
                    self._signal_group(signal.SIGKILL)
                    self._wait_exit(time.monotonic() + _KILL_WAIT_S)
                    killed = True
            self._reap(killed=killed)
        finally:
            self.stop_s = time.monotonic() - started
            self._close_client()
        logger.info("worker %s stopped in %.3f s", self.node_name, self.stop_s)

    def kill(self, sig: int = signal.SIGKILL, *, group: bool = True) -> None:
        """Send ``sig`` to every process of the worker (``group``) or only to the main one.

        With SIGKILL it waits until the main process is gone; with ``group`` it also reaps it,
        so the worker is finished. After ``kill(SIGKILL, group=False)`` prefork's children may
        still be alive (to be observed); ``stop()`` kills them.
        """
        if self._proc is None or self._finished:
            return
        if group:
            self._signal_group(sig)
        elif self._exit_status() is None:
            os.kill(self._proc.pid, sig)
        if sig == signal.SIGKILL:
            self._wait_exit(time.monotonic() + _KILL_WAIT_S)
            if group:
                self._reap(killed=True)
                self._close_client()

    # -- process state -----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self!r} has no process: call start() first")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The main process's exit code (negative: killed by that signal); None while alive."""
        return self._exit_status()

    def is_alive(self) -> bool:
        return self._proc is not None and self._exit_status() is None

    def group_pids(self) -> list[int]:
        """The live processes of the worker's process group (the main one and prefork's)."""
        if self._proc is None:
            return []
        pgid = self._proc.pid
        found = []
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    def _exit_status(self) -> int | None:
        """The main process's exit status; never reaps it (see _PopenChild.peek)."""
        return None if self._proc is None else self._proc.peek()

    def _wait_exit(self, deadline: float) -> bool:
        while self._exit_status() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_EXIT_POLL_S)
        return True

    def _signal_group(self, sig: int) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return  # reaped: the group id may belong to someone else now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _reap(self, *, killed: bool = False) -> None:
        """Kill what is left of the group (the main process has exited), then reap.

        Returns once no process of the group is left: a SIGKILLed process can take a moment
        to die on a busy machine. ``killed``: the group was just SIGKILLed, stragglers are
        expected and not worth a warning.
        """
        proc = self._proc
        if proc is None or self._finished:
            return
        if self._stacks_token is not None:
            stacks.unregister(self._stacks_token)
            self._stacks_token = None
        if proc.returncode is None:
            leftovers = self._others_in_group()
            if leftovers:
                if not killed:
                    logger.warning(
                        "worker %s exited but left processes %s in its group; killing them",
                        self.node_name,
                        leftovers,
                    )
                # The unreaped main process keeps the group id ours while we wait.
                self._signal_group(signal.SIGKILL)
                deadline = time.monotonic() + _KILL_WAIT_S
                while self._others_in_group() and time.monotonic() < deadline:
                    time.sleep(_EXIT_POLL_S)
            proc.wait(timeout=_KILL_WAIT_S)
        self._finished = True
        self._delete_queue()

    def dump_stacks(self) -> str:
        """Every thread's stack of each live process of the worker: the main one, then the
        pool's (prefork); taken with SIGUSR2, which the worker app answers in C."""
        if self._proc is None:
            return "(not started)"
        main = self._proc.pid
        pids = [
            (pid, "main process" if pid == main else "pool process") for pid in self.group_pids()
        ]
        pids.sort(key=lambda item: item[0] != main)
        return take_stacks(self.stacks_path, pids) if pids else "(no live process)"

    def _others_in_group(self) -> list[int]:
        main = self._proc.pid if self._proc is not None else None
        return [pid for pid in self.group_pids() if pid != main]

    def _delete_queue(self) -> None:
        # Celery declared the queue and its exchange on the broker: they would pile up on a
        # broker that outlives the test session (two keys per worker on Redis, a durable
        # queue on RabbitMQ).
        if not self._owns_queue or self._client is None:
            return
        # Declared the way Celery declares a missing queue; kombu's virtual transports (Redis)
        # only delete bindings that this channel has declared itself.
        entity: Any = kombu.entity  # kombu's Queue and Exchange are untyped
        queue = entity.Queue(
            self.queue, entity.Exchange(self.queue, type="direct"), routing_key=self.queue
        )
        try:
            with self._client.connection_for_write() as conn:
                bound = queue(conn.default_channel)
                bound.declare()
                bound.delete()
                bound.exchange.delete()
        except Exception as exc:  # best effort: cleanup never hides what happened before it
            # One line: the broker is often gone by now (that is why the stack is stopping),
            # and kombu's chained traceback would bury the message that says so.
            logger.warning(
                "could not delete queue %s from the broker at %s: %s: %s",
                self.queue,
                mask_secrets(self.broker_url),
                type(exc).__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            )

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- talking to it -----------------------------------------------------------------------

    def _require_client(self) -> Celery:
        if self._client is None:
            raise RuntimeError(f"{self!r} is not running: start() it first")
        return self._client

    def ping(self, timeout: float = 1.0) -> bool:
        """Whether the worker answers a control ping within ``timeout`` seconds."""
        client = self._require_client()
        replies: list[dict[str, Any]] | None = client.control.ping(
            destination=[self.node_name], timeout=timeout
        )
        return any(self.node_name in reply for reply in replies or [])

    def idle(self, timeout: float = _IDLE_CHECK_TIMEOUT_S) -> bool:
        """Whether the worker has nothing to do or finish: its queue is empty, and it says it
        runs, holds and schedules no task. False when it does not answer in ``timeout`` s."""
        client = self._require_client()
        try:
            if self._waiting_messages(client):
                return False
            inspect = client.control.inspect(destination=[self.node_name], timeout=timeout)
            for asked in (inspect.active, inspect.reserved, inspect.scheduled):
                replies: dict[str, list[Any]] | None = asked()
                if not replies or self.node_name not in replies or replies[self.node_name]:
                    return False
        except Exception as exc:  # not sure: the warm shutdown is the safe way
            logger.info("worker %s: idle check failed (%s); stopping it warm", self.node_name, exc)
            return False
        return True

    def _waiting_messages(self, client: Celery) -> int:
        """Messages waiting in the worker's queue; a queue the broker does not know holds none
        (Redis keeps no key for an empty list, and its passive declare says 404)."""
        with client.connection_for_write() as conn:
            try:
                _, waiting, _ = conn.default_channel.queue_declare(self.queue, passive=True)
            except conn.channel_errors as exc:
                # py-amqp's reply code, an int from RabbitMQ, a string from kombu's Redis.
                if str(getattr(exc, "reply_code", "")) == str(_NOT_FOUND):
                    return 0
                raise
        return int(waiting)

    def send(self, run_id: int, *, loop_mode: LoopMode | str | None = None, **options: Any) -> str:
        """Enqueue ``execute_ingest(run_id)`` on this worker's queue; return the task id.

        ``loop_mode`` goes in the ``harness_loop_mode`` header (none: the worker's default);
        ``options`` are ``apply_async`` options (``countdown``, ``headers``, ``queue`` ...).
        """
        headers = dict(options.pop("headers", None) or {})
        if loop_mode is not None:
            headers[LOOP_MODE_HEADER] = parse_loop_mode(str(loop_mode)).value
        client = self._require_client()
        options.setdefault("queue", self.queue)
        result = client.send_task(self.target.task_name, args=[run_id], headers=headers, **options)
        return str(result.id)

    # -- its log -----------------------------------------------------------------------------

    def log_mark(self) -> int:
        """A position in the log: pass it as ``since`` to see only what was written after it.

        A worker shared by several tests needs it: run ids restart when a test truncates the
        table, so an earlier test's "Starting run 1" is still in the file.
        """
        try:
            return max(self.log_path.stat().st_size, self._log_offset)
        except FileNotFoundError:
            return self._log_offset

    def read_log(self, since: int | None = None) -> str:
        """The worker's log from ``since`` (a :meth:`log_mark`; default: this worker's start)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset if since is None else since)
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, since: int | None = None) -> list[LogLine]:
        """The worker's log from ``since``, parsed into records."""
        return read_log_file(self.log_path, offset=self._log_offset if since is None else since)

    def wait_for_log(
        self,
        predicate: Callable[[list[LogLine]], bool],
        *,
        since: int | None = None,
        timeout: float = 10.0,
        what: str = "the expected log lines",
    ) -> list[LogLine]:
        """Poll the log until ``predicate(lines)`` holds; return the lines.

        Raises TimeoutError (with the log's tail) at the deadline, or as soon as the worker
        has exited without writing them.
        """
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines(since)
            if predicate(lines):
                return lines
            code = self._exit_status()
            if code is not None or time.monotonic() >= deadline:
                reason = f"exited with code {code}" if code is not None else f"{timeout:g} s passed"
                tail = "\n".join(
                    f"    {mask_secrets(line)}"
                    for line in self.read_log(since).splitlines()[-LOG_TAIL_LINES:]
                )
                raise TimeoutError(
                    f"worker {self.node_name}: {what} did not appear in {self.log_path} "
                    f"({reason}); last lines:\n{tail or '    (empty)'}"
                )
            time.sleep(_LOG_POLL_S)

    def wait_for_task(
        self, task_id: str, *, since: int | None = None, timeout: float = 10.0
    ) -> list[LogLine]:
        """Wait until Celery logged how task ``task_id`` ended; every line it wrote is in."""
        return self.wait_for_log(
            lambda lines: bool(trace_lines(lines, task_id)),
            since=since,
            timeout=timeout,
            what=f"the end of task {task_id}",
        )
