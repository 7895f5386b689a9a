"""A fork server: Celery workers forked from a process that has already imported Celery.

A worker's boot is mostly imports: Celery, kombu, billiard, click and the app's libraries
(SQLAlchemy, pydantic, httpx ...) cost some 0.5 s of CPU, paid again by every worker. The
fork server pays it once: it imports Celery's worker machinery and the modules the Target
names as ``worker_preload``, then forks a worker per request. Each child replaces its
environment, working directory, ``sys.path`` and ``sys.argv`` with the request's and runs
``python -m celery ...`` in place (:func:`runpy.run_module`), as a new interpreter would.
The app itself is imported after the fork: it reads its settings on import.

What carries over from the server is only what was imported, and the server's environment
is the harness's own minus the app's and the harness's variables (``APP_*``, ``HARNESS_*``,
``CELERY_*``): a library that reads a variable on import reads the same value as in a worker
started with ``exec``. Pools that patch the standard library before anything else is imported
(gevent) are not forked: :meth:`ForkServer.can_fork` says no, and the caller execs them.

The process handling keeps every guarantee a ``Popen`` child has:

- each child is a session (and process group) of its own, with its log file as stdout and
  stderr and ``/dev/null`` as stdin;
- it dies with the server (Linux's parent-death signal, SIGKILL, armed before it runs);
- the server never reaps a child on its own: an exited child stays a zombie, so its pid (and
  process group id) cannot be reused while the harness may still signal it; the harness asks
  for its status without reaping, and reaps it when it is done with it;
- the server exits, killing every child's process group first, when the harness closes the
  connection or dies (the kernel closes the socket), or when its parent changes.

The server's program is :mod:`harness.workers._forkserver` (``python -m``): it imports only
the standard library, so that nothing of the harness or the app is loaded into the server,
nor inherited by a worker.

Protocol: one JSON object per line on a Unix socket pair, one request at a time. The server
says ``{"ready": ...}`` once its imports are done; then ``spawn`` (argv, env, cwd, log) answers
the child's pid, ``status`` its exit status or null (without reaping), ``reap`` reaps it.

Exceptions::

    SetupError (harness.core.errors)
     └── ForkServerError   the server is not running, did not start, or broke the protocol
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Self

from harness.core.errors import SetupError
from harness.core.pythons import WORKER_PYTHON_ENV
from harness.core.target import default_target_spec, load_target

__all__ = [
    "FORK_SERVER_ENV",
    "WORKER_PRELOAD",
    "ForkServer",
    "ForkServerError",
    "ForkedChild",
    "fork_server",
    "fork_server_settings",
    "prestart_fork_server",
    "worker_environment",
]

logger = logging.getLogger("harness.forkserver")

FORK_SERVER_ENV: Final = "HARNESS_FORK_SERVER"
# What every Celery worker imports before it reads the app: the CLI, the worker and its
# consumer, the pools that can be forked, the transports' clients.
WORKER_PRELOAD: Final = (
    "celery.bin.celery",
    "celery.apps.worker",
    "celery.worker.consumer",
    "celery.concurrency.solo",
    "celery.concurrency.prefork",
    "celery.concurrency.thread",
    "kombu.transport.redis",
    "kombu.transport.pyamqp",
    "psutil",
)
# gevent and eventlet monkey-patch the standard library at the worker's start: in a process
# that has imported ssl, threading and socket users already, that is too late.
_FORKABLE_POOLS: Final = frozenset({"solo", "prefork", "threads"})
# The server's program: the standard library only, nothing of ours is imported there.
_PROGRAM: Final = "harness.workers._forkserver"
_READY_TIMEOUT_S: Final = 60.0
_REPLY_TIMEOUT_S: Final = 10.0
_STOP_TIMEOUT_S: Final = 5.0
_OUTPUT_LINES: Final = 20
_VOLATILE_ENV_PREFIX: Final = "PYTEST_"


def _with_worker_preload(preload: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*WORKER_PRELOAD, *preload)))


class ForkServerError(SetupError):
    """The fork server cannot serve: not started, gone, or it answered nonsense."""


class ForkedChild:
    """A process the fork server forked: ``Popen``'s handle, as far as the harness uses it.

    ``peek()`` is its exit status without reaping it (None while it runs); ``wait()`` reaps it,
    after which ``returncode`` is set and its pid must not be signalled any more. If the server
    is gone, so is the child (its parent-death signal): it reads as killed by SIGKILL.
    """

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"<ForkedChild pid {self.pid} of fork server {self.server.pid}>"

    def peek(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            status: int | None = self.server.request("status", pid=self.pid)["status"]
        except ForkServerError:
            self.returncode = -signal.SIGKILL  # died with the server; the kernel reaped it
            return self.returncode
        return status

    def wait(self, timeout: float | None = None) -> int:
        """Wait until it has exited, then reap it; raise subprocess.TimeoutExpired."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if self.peek() is not None and self.returncode is None:
                try:
                    self.returncode = self.server.request("reap", pid=self.pid)["status"]
                except ForkServerError:
                    self.returncode = -signal.SIGKILL
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout or 0.0)
            time.sleep(0.005)
        return self.returncode


class ForkServer:
    """One fork server process for one harness process; start it early, stop it last.

    ``python`` is the interpreter (the workers'), ``env`` the server's environment, ``preload``
    the modules it imports besides :data:`WORKER_PRELOAD`. Its command line says whose it is
    (``--for pid N in DIR``); what it prints (a preload that failed, a crash) is logged on
    ``harness.forkserver`` and kept for error messages.

    ``start()`` returns at once; the first ``spawn()`` waits for the imports. Thread-safe.
    """

    def __init__(self, *, python: str, env: Mapping[str, str], preload: Sequence[str] = ()) -> None:
        self.python = python
        self.env = dict(env)
        self.preload = _with_worker_preload(preload)
        self.ready_s: float | None = None
        self.failed_preload: list[str] = []
        self.output: deque[str] = deque(maxlen=_OUTPUT_LINES)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._buffer = b""
        self._ready = False
        self._broken: str | None = None
        self._lock = threading.Lock()
        self._started = 0.0

    def __repr__(self) -> str:
        return f"<ForkServer pid {self.pid}>"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def same_as(self, *, python: str, env: Mapping[str, str], preload: Sequence[str]) -> bool:
        """Whether this server is what ``ForkServer(python=..., env=..., preload=...)`` would be
        (pytest's own ``PYTEST_*`` variables, which change from test to test, aside)."""
        wanted = _with_worker_preload(preload)
        differ = sorted(
            key
            for key in set(env) ^ set(self.env) | {k for k in env if env[k] != self.env.get(k)}
            if not key.startswith(_VOLATILE_ENV_PREFIX)
        )
        if differ:
            logger.info("fork server %s: the environment differs in %s", self.pid, differ)
        return (python, wanted) == (self.python, self.preload) and not differ

    def can_fork(self, *, python: str, pool: str) -> bool:
        """Whether a worker of ``pool`` run by ``python`` can be forked from this server."""
        return python == self.python and pool in _FORKABLE_POOLS and self._broken is None

    def start(self) -> Self:
        if self._proc is not None:
            return self
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._started = time.monotonic()
        label = f"pid {os.getpid()} in {os.getcwd()}"
        try:
            command = [self.python, "-m", _PROGRAM, "--fd", str(theirs.fileno())]
            command += ["--for", label, *self.preload]
            self._proc = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(theirs.fileno(),),
                # Not in the harness's process group: a Ctrl-C is the harness's to handle.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._reader = threading.Thread(
            target=self._read_output, name=f"fork-server-{self._proc.pid}", daemon=True
        )
        self._reader.start()
        return self

    def _read_output(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        with proc.stdout:
            for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip()
                self.output.append(line)
                logger.warning("fork server %d: %s", proc.pid, line)

    def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: str, log_path: Path
    ) -> ForkedChild:
        """Fork ``python -m <argv[0]> <argv[1:]>`` (``argv`` as after ``-m``); its pid's handle."""
        reply = self.request("spawn", argv=list(argv), env=dict(env), cwd=cwd, log=str(log_path))
        return ForkedChild(self, int(reply["pid"]))

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request and its reply; ForkServerError if the server cannot answer."""
        with self._lock:
            if self._broken is not None:
                raise ForkServerError(self._broken)
            try:
                if not self._ready:
                    self._hello()
                sock = self._require_sock()
                sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
                reply = self._read_reply(time.monotonic() + _REPLY_TIMEOUT_S, op)
            except (OSError, ValueError, ForkServerError) as exc:
                self._broken = f"fork server {self.pid} failed on {op!r}: {exc}"
                raise ForkServerError(self._broken) from exc
            if "error" in reply:
                raise ForkServerError(f"fork server {self.pid}: {op} failed: {reply['error']}")
            return reply

    def _hello(self) -> None:
        hello = self._read_reply(self._started + _READY_TIMEOUT_S, "start")
        self._ready = True
        self.ready_s = time.monotonic() - self._started
        self.failed_preload = list(hello.get("failed", []))
        logger.info(
            "fork server %s ready %.3f s after its start (its imports: %.3f s)",
            self.pid,
            self.ready_s,
            float(hello.get("s", 0.0)),
        )
        if self.failed_preload:
            logger.warning(
                "fork server %s: could not preload %s; its workers import them themselves",
                self.pid,
                ", ".join(self.failed_preload),
            )

    def _require_sock(self) -> socket.socket:
        if self._sock is None:
            raise ForkServerError("the fork server was not started (or was stopped)")
        return self._sock

    def _read_reply(self, deadline: float, op: str) -> dict[str, Any]:
        sock = self._require_sock()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ForkServerError(f"no answer to {op!r} in time{self._said()}")
            readable, _, _ = select.select([sock], [], [], remaining)
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    code = self._proc.wait(_STOP_TIMEOUT_S) if self._proc is not None else None
                    if self._reader is not None:
                        self._reader.join(_STOP_TIMEOUT_S)
                    raise ForkServerError(
                        f"it exited (code {code}) before it answered {op!r}{self._said()}"
                    )
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _said(self) -> str:
        return f"; it said: {' | '.join(self.output)}" if self.output else ""

    def stop(self) -> None:
        """Close the connection: the server kills what is left of its children and exits.
        Idempotent; kills the server if it does not exit in time."""
        with self._lock:
            sock, self._sock = self._sock, None
            self._broken = self._broken or "the fork server was stopped"
        if sock is not None:
            sock.close()
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "fork server %d did not exit in %g s; killing it", proc.pid, _STOP_TIMEOUT_S
            )
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(_STOP_TIMEOUT_S)


# -- the harness's fork server ---------------------------------------------------------------

# A worker gets only the app settings it is given: ours must not leak into it (and neither must
# the Target's own prefix).
_DROPPED_ENV_PREFIXES: Final = ("HARNESS_", "CELERY_")


def worker_environment(
    env: Mapping[str, str], extra: Mapping[str, str] | None, *, drop: str
) -> dict[str, str]:
    """A worker's environment: this process's without the harness's, Celery's and ``drop``
    (the app's prefix) variables, unbuffered output, then ``env`` and ``extra``."""
    prefixes = (*_DROPPED_ENV_PREFIXES, drop)
    merged = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    merged["PYTHONUNBUFFERED"] = "1"
    merged.update(env)
    merged.update(extra or {})
    return merged


def fork_server_settings(target: str | None = None) -> dict[str, Any]:
    """What a fork server for the workers of ``target`` (default: the session's) is made of:
    their interpreter, their environment without any per-worker variable, and the Target's
    ``worker_preload``."""
    spec = target or default_target_spec()
    loaded = load_target(spec)
    env = worker_environment({}, None, drop=loaded.env_prefix)
    path = loaded.pythonpath(spec, env.get("PYTHONPATH"))
    if path:
        env["PYTHONPATH"] = path
    python = os.environ.get(WORKER_PYTHON_ENV) or sys.executable
    return {"python": python, "env": env, "preload": loaded.worker_preload}


_prestarted: ForkServer | None = None
_prestarted_lock = threading.Lock()


def prestart_fork_server(*, target: str | None = None) -> None:
    """Start this process's fork server now, for :func:`fork_server` to hand out later.

    Its imports take about as long as a worker's boot: begun before pytest collects and the
    session's services start, they are done when the first worker is asked for. One that is
    never taken is stopped at exit (and dies with this process in any case).
    """
    global _prestarted
    if not sys.platform.startswith("linux"):
        return
    with _prestarted_lock:
        if _prestarted is None:
            _prestarted = ForkServer(**fork_server_settings(target)).start()
            atexit.register(_stop_prestarted)


def _stop_prestarted() -> None:
    global _prestarted
    with _prestarted_lock:
        server, _prestarted = _prestarted, None
    if server is not None:
        server.stop()


def fork_server(*, target: str | None = None) -> ForkServer | None:
    """A started fork server for the workers of ``target``, now the caller's to stop: the one
    :func:`prestart_fork_server` started if it fits (same interpreter, environment, preload),
    else a new one. None where there is no ``fork()``."""
    global _prestarted
    if not sys.platform.startswith("linux"):
        return None
    settings = fork_server_settings(target)
    with _prestarted_lock:
        early, _prestarted = _prestarted, None
    if early is not None:
        if early.same_as(**settings):
            return early
        logger.info("fork server %s was started for other settings; starting another", early.pid)
        early.stop()
    return ForkServer(**settings).start()
