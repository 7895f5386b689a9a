"""The fork server's program (``python -m harness.workers._forkserver --fd N --for LABEL
MODULE...``); the harness's side, and what the guarantees are: :mod:`harness.workers.forkserver`.

It imports the standard library only (and then the preload modules it is given): nothing of
the harness or the app is loaded into the server, nor inherited by a worker. It serves one
request at a time on the socket ``--fd``, never reaps a child unasked, and exits, killing each
child's process group, when the socket closes or its parent changes.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, Final

from harness._deathsig import PR_SET_PDEATHSIG, load_prctl

_PARENT_CHECK_S: Final = 1.0
# Looked up once, in the server: the forked child only makes the call.
_PRCTL: Final = load_prctl()


def _status_code(si_code: int, si_status: int) -> int:
    """A ``waitid`` result as ``Popen.returncode`` has it: the exit code, or minus the signal."""
    return si_status if si_code == os.CLD_EXITED else -si_status


class _Job:
    """What a forked child runs once the server's frames are gone."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def run(self) -> None:
        import runpy

        module, *args = self.argv
        sys.argv = [module, *args]  # run_module puts the module's file in sys.argv[0]
        runpy.run_module(module, run_name="__main__", alter_sys=True)


def _preload(modules: Sequence[str]) -> list[str]:
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the worker imports (and fails on) it itself
            print(f"fork server: cannot preload {name}: {type(exc).__name__}: {exc}", flush=True)
            failed.append(name)
    return failed


def _become_child(request: Mapping[str, Any], server: int, own_path: Sequence[str]) -> _Job:
    """In the forked child: a session of its own that dies with the server, the request's
    stdio, directory, environment and import path."""
    os.setsid()
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:
        os._exit(1)  # the server died before the death signal was armed
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    os.chdir(request["cwd"])
    env: dict[str, str] = request["env"]
    os.environ.clear()
    os.environ.update(env)
    # As ``python -m`` builds it: the directory, then $PYTHONPATH, then the rest (the server's
    # own $PYTHONPATH entries make way for the request's).
    rest = sys.path[1 + len(own_path) :]
    wanted = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *wanted, *rest]
    gc.unfreeze()
    return _Job(list(request["argv"]))


def exit_status(pid: int, *, reap: bool) -> int | None:
    """Child ``pid``'s exit status (``Popen.returncode``'s form), None while it runs; with
    ``reap`` False it stays a zombie, so its pid and process group id stay reserved."""
    flags = os.WEXITED | os.WNOHANG | (0 if reap else os.WNOWAIT)
    info = os.waitid(os.P_PID, pid, flags)
    if info is None or info.si_pid == 0:
        return None
    return _status_code(info.si_code, info.si_status)


def _serve(sock: socket.socket, preload: Sequence[str]) -> _Job | None:
    """The server's loop; returns in a forked child (its job) or when the harness is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server, parent = os.getpid(), os.getppid()
    own_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    started = time.monotonic()
    failed = _preload(preload)
    gc.collect()
    gc.freeze()  # keeps the imported objects' pages shared with the children
    hello = {"ready": True, "failed": failed, "s": time.monotonic() - started}
    try:
        sock.sendall(json.dumps(hello).encode() + b"\n")
    except OSError:  # the harness stopped this server (or died) before it was ready
        return None
    children: set[int] = set()
    buffer = b""
    try:
        while True:
            readable, _, _ = select.select([sock], [], [], _PARENT_CHECK_S)
            if not readable:
                if os.getppid() != parent:
                    return None
                continue
            try:
                chunk = sock.recv(65536)
            except OSError:  # reset: the harness closed it with our hello unread
                chunk = b""
            if not chunk:
                return None  # the harness closed the connection, or died
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                request = json.loads(line)
                reply: dict[str, Any]
                try:
                    op = request["op"]
                    if op == "spawn":
                        pid = os.fork()
                        if pid == 0:
                            sock.close()
                            try:
                                return _become_child(request, server, own_path)
                            except BaseException:  # a directory or log that is not there
                                traceback.print_exc()  # to the log, once stderr is it
                                sys.stderr.flush()
                                os._exit(1)
                        children.add(pid)
                        reply = {"pid": pid}
                    elif op == "status":
                        reply = {"status": exit_status(int(request["pid"]), reap=False)}
                    elif op == "reap":
                        pid = int(request["pid"])
                        reply = {"status": exit_status(pid, reap=True)}
                        if reply["status"] is not None:
                            children.discard(pid)
                    else:
                        reply = {"error": f"unknown op {op!r}"}
                except (OSError, KeyError, TypeError, ValueError) as exc:
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                try:
                    sock.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    return None  # the harness is gone
    finally:
        if os.getpid() == server:  # not in a child that is on its way to its job
            _kill_children(children)


def _kill_children(children: set[int]) -> None:
    """Each child's process group (prefork's pool too) killed and reaped. The child itself
    is killed too: one that left its group would otherwise keep this process waiting."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _main(argv: Sequence[str]) -> _Job | None:
    args = list(argv)
    fd = int(args[args.index("--fd") + 1])
    at = args.index("--for")
    preload = args[at + 2 :]
    return _serve(socket.socket(fileno=fd), preload)


if __name__ == "__main__":
    _job = _main(sys.argv[1:])
    if _job is not None:
        _job.run()  # a forked child: it exits as ``python -m`` would, when its module returns
