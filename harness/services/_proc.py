"""Child-process plumbing for the local servers: spawn them so they can never outlive us.

Every child runs in its own session (a terminal Ctrl-C reaches pytest, not the servers, so they
are stopped in order by the stack), gets PR_SET_PDEATHSIG (the kernel kills it if we die, even by
SIGKILL), and, when we are root, runs as an unprivileged user (initdb/postgres refuse root).
An atexit backstop stops whatever is still running at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from harness._deathsig import PR_SET_PDEATHSIG, load_prctl
from harness.core.poll import poll_until

log = logging.getLogger("harness.services")

T = TypeVar("T")

DIR_PREFIX = "ingest-harness-"


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account a child runs as when we are root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def unprivileged_user(candidates: Sequence[str] = ("postgres", "nobody")) -> RunAs | None:
    """The account to demote children to: None unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in candidates:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        # Resolved here, in the parent: NSS lookups (initgroups) in a forked child of a
        # multi-threaded process can deadlock on locks held by other threads at fork time.
        groups = tuple(os.getgrouplist(name, pw.pw_gid))
        return RunAs(name=name, uid=pw.pw_uid, gid=pw.pw_gid, groups=groups)
    raise RuntimeError(f"running as root and none of the users {list(candidates)} exist")


# Looked up once in the parent so the forked child only makes the call.
_PRCTL = load_prctl()


def _make_preexec(deathsig: int) -> Callable[[], None]:
    parent = os.getpid()
    prctl = _PRCTL

    def preexec() -> None:
        # Runs in the child after fork, after Popen switched uid/gid (setting the uid clears
        # the death signal, so it must come after), before exec (it survives exec).
        if prctl is None:
            return
        prctl(PR_SET_PDEATHSIG, deathsig)
        if os.getppid() != parent:  # we died between fork and prctl: nobody will signal it
            os._exit(1)

    return preexec


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_path: Path,
    deathsig: signal.Signals,
    run_as: RunAs | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout+stderr appended to `log_path`, tied to our lifetime.

    The uid/gid switch uses Popen's own (C, async-signal-safe) implementation rather than
    Python code in preexec_fn; preexec only sets the death signal, which must follow it.
    """
    child_env = dict(env) if env is not None else minimal_env()

    def popen() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                [os.fspath(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=child_env,
                close_fds=True,
                start_new_session=True,
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=list(run_as.groups) if run_as else None,
                preexec_fn=_make_preexec(deathsig),
            )

    return _in_lasting_thread(popen)


# The death signal fires when the *thread* that forked the child ends, not the process. A stack
# started from a worker thread (an executor, an async fixture's to_thread) would lose its servers
# when that thread finishes, so such spawns are handed to one daemon thread that lives as long
# as the process. The main thread lives that long already.
_spawner_queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] | None = None
_spawner_lock = threading.Lock()


def _spawner_loop(q: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
    while True:
        fn, fut = q.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)


def _in_lasting_thread(fn: Callable[[], T]) -> T:
    global _spawner_queue
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _spawner_lock:
        if _spawner_queue is None:
            _spawner_queue = queue.SimpleQueue()
            threading.Thread(
                target=_spawner_loop,
                args=(_spawner_queue,),
                name="harness-services-spawner",
                daemon=True,
            ).start()
        q = _spawner_queue
    fut: Future[T] = Future()
    q.put((fn, fut))
    return fut.result()


def minimal_env() -> dict[str, str]:
    """A small, predictable environment for server processes (no stray PG*/REDIS* settings)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """True once `proc` is dead, leaving it unreaped (a zombie) where the OS allows.

    While the zombie exists its pid, and so its process-group id, cannot be reused, which
    makes the killpg that follows safe.
    """
    if proc.returncode is not None:
        return True
    if hasattr(os, "waitid"):
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, proc.pid, flags) is not None
        except ChildProcessError:  # reaped behind Popen's back
            proc.poll()
            return True
    return proc.poll() is not None


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    # Polling, not Popen.wait(): wait() blocks on a lock that a signal handler calling stop()
    # could find held by the very frame it interrupted.
    return poll_until(lambda: True if cond() else None, timeout=timeout) is not None


def terminate(
    proc: subprocess.Popen[bytes], name: str, sig: signal.Signals, timeout: float
) -> None:
    """Send `sig`, wait up to `timeout` s, then SIGKILL the child's whole process group, reap."""
    if not _has_exited(proc):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        if not _wait(lambda: _has_exited(proc), timeout):
            log.warning(
                "%s (pid %d) still running %.1fs after %s; killing it",
                name,
                proc.pid,
                timeout,
                sig.name,
            )
    # The child leads its own process group (start_new_session) and its own children (postgres
    # backends) share it: anything left in the group is a straggler of that server.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if not _wait(lambda: proc.poll() is not None, 5.0):
        log.error("%s (pid %d) survived SIGKILL for 5s", name, proc.pid)


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago; callers retry if a server then fails to bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def tcp_answers(host: str, port: int, timeout: float) -> bool:
    """True if something accepts a TCP connection at host:port within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_tail(path: Path, lines: int = 25) -> list[str]:
    """The last `lines` lines of a log file ([] if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def default_workdir() -> Path:
    """Where servers keep their data: tmpfs (/dev/shm) when there is one, else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def make_instance_dir(workdir: Path, kind: str, run_as: RunAs | None) -> Path:
    """A fresh private dir for one server, named with our pid so leftovers can be swept."""
    if run_as is not None:
        ensure_reachable(workdir, run_as)
    sweep_stale_dirs(workdir)
    path = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-{kind}-", dir=workdir))
    if run_as is not None:
        try:
            os.chown(path, run_as.uid, run_as.gid)
        except BaseException:
            remove_tree(path, f"{kind} dir")
            raise
    return path


def ensure_reachable(directory: Path, run_as: RunAs) -> None:
    """Raise PermissionError unless `run_as` can enter `directory` and every dir above it."""
    directory = directory.resolve()
    for d in (directory, *directory.parents):
        st = d.stat()
        if st.st_uid == run_as.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in run_as.groups or st.st_gid == run_as.gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise PermissionError(
                f"user {run_as.name!r} (uid {run_as.uid}) cannot enter {d} "
                f"(mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid})"
            )


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), uid, gid)


def remove_tree(path: Path, what: str) -> None:
    """rmtree that logs what it could not remove instead of raising."""

    def onerror(func: Callable[..., object], p: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            log.warning("could not remove %s while cleaning up %s: %s", p, what, exc)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onerror)
    else:
        shutil.rmtree(path, onerror=lambda f, p, ei: onerror(f, p, ei[1]))


# Our instance dirs (ingest-harness-<pid>-pg-...) and half-built templates
# (.pgtemplate-*.<pid>.<hex>.tmp).
_OWNED = re.compile(
    rf"^{re.escape(DIR_PREFIX)}(\d+)-(?:pg|redis)-|^\.pgtemplate-.+\.(\d+)\.[0-9a-f]{{8}}\.tmp$"
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_dirs(root: Path) -> None:
    """Remove our dirs in `root` whose owning process is gone (it was SIGKILLed: no atexit).

    Its servers died with it (death signal); only their files on tmpfs would remain.
    """
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        m = _OWNED.match(entry.name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        log.info("removing %s left behind by dead process %d", entry.path, pid)
        remove_tree(Path(entry.path), f"leftovers of pid {pid}")


# --- atexit backstop -------------------------------------------------------------------------

_live: dict[int, Callable[[], None]] = {}
_atexit_registered = False


def track(obj: object, stop: Callable[[], None]) -> None:
    """Make sure `stop` runs at interpreter exit unless `untrack(obj)` is called first."""
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_stop_all)
        _atexit_registered = True
    _live[id(obj)] = stop


def untrack(obj: object) -> None:
    _live.pop(id(obj), None)


def _stop_all() -> None:
    # Newest first: a stack registered before its servers is stopped after them (either way
    # works: every stop is idempotent).
    for key in reversed(list(_live)):
        stop = _live.pop(key, None)
        if stop is None:
            continue
        try:
            stop()
        except Exception:
            log.exception("services: error while stopping at interpreter exit")


def _forget_in_child() -> None:
    # A forked child (multiprocessing, a test's os.fork) must not stop our servers when it exits,
    # and it has no spawner thread (only the forking thread survives a fork).
    global _spawner_queue, _spawner_lock
    _live.clear()
    _spawner_queue = None
    _spawner_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
