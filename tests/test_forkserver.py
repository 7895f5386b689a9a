"""The fork server (harness.workers.forkserver): a forked child is what ``python -m`` would be,
and the harness keeps every guarantee it has over a ``Popen`` child.

The children here run a small probe module from this test's ``tmp_path`` (on the request's
``PYTHONPATH``), not Celery: what is checked is the process, its environment and its end. The
workers the farm forks are checked by the worker tests (tests/test_worker.py runs its process
tests both ways) and by every matrix scenario, which run on forked workers.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import psutil
import pytest

from harness.workers.forkserver import (
    WORKER_PRELOAD,
    ForkedChild,
    ForkServer,
    ForkServerError,
    fork_server_settings,
)

_GONE_S: Final = 10.0

# Writes what it sees as JSON to $PROBE_OUT, then exits with $PROBE_EXIT (or sleeps forever
# with PROBE_SLEEP=1).
_PROBE: Final = textwrap.dedent(
    """\
    import json, os, signal, sys, time

    out = {
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "path0": sys.path[0],
        "path1": sys.path[1],
        "env_probe": os.environ.get("PROBE_VALUE"),
        "env_dropped": os.environ.get("ONLY_IN_SERVER"),
        "pgid_is_pid": os.getpgid(0) == os.getpid(),
        "sid_is_pid": os.getsid(0) == os.getpid(),
        "ppid": os.getppid(),
        "sigint_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        "stdin": os.readlink("/proc/self/fd/0"),
        "preloaded": sorted(
            m for m in ("celery.bin.celery", "kombu", "sqlalchemy") if m in sys.modules
        ),
        "ours": sorted(m for m in sys.modules if m.split(".")[0] in ("harness", "app", "fixtures")),
        "main": __name__,
    }
    with open(os.environ["PROBE_OUT"], "w") as fh:
        json.dump(out, fh)
    print("probe printed this")
    sys.stdout.flush()
    if os.environ.get("PROBE_SLEEP"):
        while True:
            time.sleep(1)
    sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
    """
)


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    settings = fork_server_settings()
    env = dict(settings["env"], ONLY_IN_SERVER="1")
    started = ForkServer(python=settings["python"], env=env, preload=("sqlalchemy",)).start()
    yield started
    started.stop()


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    root = tmp_path / "probe-root"
    root.mkdir()
    (root / "harness_probe_module.py").write_text(_PROBE)
    return root


def spawn(
    server: ForkServer, probe: Path, tmp_path: Path, **env: str
) -> tuple[ForkedChild, Path, Path]:
    out = tmp_path / "probe.json"
    log = tmp_path / "probe.log"
    child_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(probe), "PROBE_OUT": str(out)}
    child_env.update(env)
    child = server.spawn(
        ["harness_probe_module", "--flag", "value"], env=child_env, cwd=str(tmp_path), log_path=log
    )
    return child, out, log


def read_probe(out: Path, child: ForkedChild) -> dict[str, Any]:
    deadline = time.monotonic() + _GONE_S
    while not out.exists() or not out.read_text():
        assert time.monotonic() < deadline, f"the probe (pid {child.pid}) wrote nothing"
        time.sleep(0.01)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + _GONE_S
    while True:
        alive = [pid for pid in pids if not gone(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def test_a_child_is_what_python_m_would_be(server: ForkServer, probe: Path, tmp_path: Path) -> None:
    child, out, log = spawn(server, probe, tmp_path, PROBE_VALUE="given", PROBE_EXIT="3")
    seen = read_probe(out, child)

    assert child.wait(timeout=_GONE_S) == 3
    assert seen["argv"] == ["--flag", "value"]
    assert seen["main"] == "__main__"
    assert seen["cwd"] == str(tmp_path)
    # sys.path as `python -m` makes it: the directory, then $PYTHONPATH.
    assert (seen["path0"], seen["path1"]) == (str(tmp_path), str(probe))
    # The request's environment only: the server's own variables are not inherited.
    assert (seen["env_probe"], seen["env_dropped"]) == ("given", None)
    # A session of its own, the server's child, Ctrl-C as Python has it, no stdin.
    assert seen["pgid_is_pid"] and seen["sid_is_pid"]
    assert seen["ppid"] == server.pid
    assert seen["sigint_default"]
    assert seen["stdin"] == os.devnull
    # What the server imported is there; of the harness only its program's packages and the
    # parent-death helper, nothing of the app.
    assert seen["preloaded"] == ["celery.bin.celery", "kombu", "sqlalchemy"]
    assert set(seen["ours"]) <= {"harness", "harness._deathsig", "harness.workers"}, seen["ours"]
    assert "probe printed this" in log.read_text()


def test_an_exited_child_stays_a_zombie_until_the_harness_reaps_it(
    server: ForkServer, probe: Path, tmp_path: Path
) -> None:
    child, out, _ = spawn(server, probe, tmp_path, PROBE_EXIT="5")
    read_probe(out, child)
    deadline = time.monotonic() + _GONE_S
    while child.peek() is None:
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)

    # Its status, asked twice, does not reap it: its pid (its group id) stays reserved.
    assert child.peek() == 5
    assert child.peek() == 5
    assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
    assert child.returncode is None  # not reaped

    code = child.wait(timeout=_GONE_S)
    assert (code, child.peek()) == (5, 5)
    assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).ppid() != server.pid


def test_a_killed_child_reads_as_minus_the_signal(
    server: ForkServer, probe: Path, tmp_path: Path
) -> None:
    child, out, _ = spawn(server, probe, tmp_path, PROBE_SLEEP="1")
    read_probe(out, child)
    assert child.peek() is None

    os.killpg(child.pid, signal.SIGKILL)  # its own group, as the harness kills a worker

    assert child.wait(timeout=_GONE_S) == -signal.SIGKILL


def test_a_preload_that_fails_is_reported_and_the_server_still_forks(
    probe: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "harness.forkserver")
    settings = fork_server_settings()
    server = ForkServer(
        python=settings["python"], env=settings["env"], preload=("harness_no_such_module",)
    ).start()
    try:
        child, out, _ = spawn(server, probe, tmp_path)
        read_probe(out, child)
        assert child.wait(timeout=_GONE_S) == 0
        assert server.failed_preload == ["harness_no_such_module"]
        assert "could not preload harness_no_such_module" in caplog.text
        assert "cannot preload harness_no_such_module: ModuleNotFoundError" in caplog.text
    finally:
        server.stop()


def test_stop_kills_what_is_left_and_the_server_exits(probe: Path, tmp_path: Path) -> None:
    server = ForkServer(**fork_server_settings()).start()
    child, out, _ = spawn(server, probe, tmp_path, PROBE_SLEEP="1")
    read_probe(out, child)
    server_pid = server.pid
    assert server_pid is not None

    server.stop()

    assert wait_gone([child.pid, server_pid]) == []
    with pytest.raises(ForkServerError, match="stopped"):
        spawn(server, probe, tmp_path)
    assert not server.can_fork(python=server.python, pool="solo")
    server.stop()  # idempotent


def test_children_die_with_a_killed_server_and_read_as_killed(probe: Path, tmp_path: Path) -> None:
    server = ForkServer(**fork_server_settings()).start()
    try:
        child, out, _ = spawn(server, probe, tmp_path, PROBE_SLEEP="1")
        read_probe(out, child)
        assert server.pid is not None

        os.kill(server.pid, signal.SIGKILL)

        # The parent-death signal took the child down; the handle says so without a server.
        assert wait_gone([child.pid]) == []
        assert child.wait(timeout=_GONE_S) == -signal.SIGKILL
        assert not server.can_fork(python=server.python, pool="solo")
    finally:
        server.stop()


_OWNER: Final = """\
import json, os, sys, time
from pathlib import Path
from harness.workers.forkserver import ForkServer, fork_server_settings

server = ForkServer(**fork_server_settings()).start()
probe, out = sys.argv[1], sys.argv[2]
env = {"PATH": os.environ["PATH"], "PYTHONPATH": probe, "PROBE_OUT": out, "PROBE_SLEEP": "1"}
log = Path(out + ".log")
child = server.spawn(["harness_probe_module"], env=env, cwd=os.getcwd(), log_path=log)
print(json.dumps({"server": server.pid, "child": child.pid}), flush=True)
time.sleep(120)
"""


def test_the_server_and_its_children_die_with_a_killed_harness(probe: Path, tmp_path: Path) -> None:
    """SIGKILL of the process that owns the server: nothing can clean up, the socket's end
    tells the server, and the server takes its children down."""
    out = tmp_path / "probe.json"
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(probe), str(out)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert owner.stdout is not None
        pids = json.loads(owner.stdout.readline())
        deadline = time.monotonic() + _GONE_S
        while not out.exists():  # the child runs
            assert time.monotonic() < deadline, "the owner's child never ran"
            time.sleep(0.01)
        assert not gone(pids["server"]) and not gone(pids["child"])

        owner.kill()
        owner.wait()

        assert wait_gone([pids["server"], pids["child"]]) == []
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()


def test_only_pools_that_can_be_forked_and_the_servers_python_are_forked() -> None:
    settings = fork_server_settings()
    server = ForkServer(**settings)  # never started: can_fork needs no process
    for pool in ("solo", "threads", "prefork"):
        assert server.can_fork(python=settings["python"], pool=pool)
    # gevent patches the standard library first thing; another interpreter is another server.
    assert not server.can_fork(python=settings["python"], pool="gevent")
    assert not server.can_fork(python="/usr/bin/python3.13", pool="solo")
    assert set(WORKER_PRELOAD) <= set(server.preload)


def test_a_prestarted_server_is_handed_out_only_for_the_same_settings() -> None:
    settings = fork_server_settings()
    server = ForkServer(**settings)
    assert server.same_as(**settings)
    # pytest's own variables change from test to test and do not count ...
    assert server.same_as(**dict(settings, env=dict(settings["env"], PYTEST_CURRENT_TEST="x")))
    # ... any other does, as does the interpreter or a preload.
    assert not server.same_as(**dict(settings, env=dict(settings["env"], SOME_LIBRARY_FLAG="1")))
    assert not server.same_as(**dict(settings, python="/usr/bin/python3.13"))
    assert not server.same_as(**dict(settings, preload=("json",)))


def test_a_server_stopped_unused_exits_quietly() -> None:
    """Its hello unread when the harness closes the socket (a session that never asked for a
    worker): the server sees the reset as the end, exits 0 and says nothing."""
    server = ForkServer(**fork_server_settings()).start()
    sock = server._sock
    assert sock is not None
    readable, _, _ = select.select([sock], [], [], 60)  # its imports are done: hello is waiting
    assert readable

    server.stop()

    assert server._proc is not None and server._proc.returncode == 0
    assert list(server.output) == []


def test_a_child_whose_directory_is_gone_exits_1_and_says_why(
    server: ForkServer, probe: Path, tmp_path: Path
) -> None:
    log = tmp_path / "probe.log"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(probe)}
    child = server.spawn(
        ["harness_probe_module"], env=env, cwd=str(tmp_path / "gone"), log_path=log
    )

    assert child.wait(timeout=_GONE_S) == 1
    assert "FileNotFoundError" in log.read_text()
    assert server.can_fork(python=server.python, pool="solo")  # the server serves on
