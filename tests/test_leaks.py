"""No process or temp dir of ours outlives a test session, however the session ends.

Each test runs a child ``python -m pytest`` on a tiny scenario that starts the session's
services (local Postgres and Redis) and a prefork Celery worker (with its children) from the
farm, writes a "ready" marker and holds everything up. The parent records every descendant
process of the child and the services' temp dirs (``ingest-harness-<pid>-*`` on tmpfs), ends
the session one way or another, and checks the process table and the directory:

- SIGINT to the session's process group (Ctrl-C in a terminal) and SIGTERM to its main process
  (``kill``, a CI timeout; ``harness.pytest.plugin`` turns it into an interrupt), each with and
  without xdist: the session tears down, so every process is gone and every temp dir removed when it
  exits;
- SIGKILL of one xdist worker, and SIGKILL of the whole session: nothing can clean up, so the
  kernel's parent-death signal must take the servers and workers down (prefork's children too);
  the temp dirs stay behind, and the next services start must sweep them.

Each runs on the local backend and, in the docker tier, on the docker backend: there the
servers are containers labelled with their owner process, and no container of the child may
survive its teardown, the surviving xdist worker's stop, or the next session's start.

pytest's own ``--basetemp`` (worker logs) is pytest's to keep or prune; it lives in this test's
``tmp_path`` and is not checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil
import pytest

from harness.services import LocalRedis, ServiceStack, probe_docker, probe_local
from harness.services._docker import LABEL_OWNER_PID, our_containers
from harness.services._proc import DIR_PREFIX, default_workdir
from tests._children import sigint_as_in_a_terminal

pytestmark = pytest.mark.integration

_READY_TIMEOUT_S: Final = 90.0
_EXIT_TIMEOUT_S: Final = 60.0
_GONE_TIMEOUT_S: Final = 15.0
_POLL_S: Final = 0.05
_OUTPUT_TAIL_LINES: Final = 40
# The prefork worker: its main process and CONCURRENCY["prefork"] children.
_WORKER_PROCESSES: Final = 3

# The child session: its own rootdir (this ini), the project's fixtures, one test that holds
# the servers up until the parent writes "release" (or a deadline passes).
_CHILD_INI: Final = """\
[pytest]
addopts = -p no:cacheprovider
asyncio_default_fixture_loop_scope = function
harness_target = fixtures.target:INGEST
"""
_CHILD_CONFTEST: Final = """\
pytest_plugins = [
    "fixtures.marketplace",
    "fixtures.app",
    "fixtures.api",
    "fixtures.worker",
]
"""
_CHILD_TEST: Final = """\
import json
import os
import time
from pathlib import Path


def test_hold(services, worker_farm):
    worker = worker_farm.worker("prefork", "redis")
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    markers = Path(os.environ["LEAKCHECK_DIR"])
    info = {"pid": os.getpid(), "name": name, "worker_pids": worker.group_pids()}
    tmp = markers / f".{name}.tmp"
    tmp.write_text(json.dumps(info))
    tmp.rename(markers / f"{name}.ready")
    deadline = time.monotonic() + 120
    while not (markers / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
"""


@dataclass(frozen=True)
class Held:
    """One pytest process that holds servers: what its marker said."""

    pid: int
    name: str
    worker_pids: tuple[int, ...]


@dataclass(frozen=True)
class Recorded:
    """A process of the child session, as first seen (psutil checks pid reuse itself)."""

    proc: psutil.Process
    description: str
    ancestors: tuple[int, ...]

    def alive(self) -> bool:
        try:
            return self.proc.is_running() and self.proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


class ChildSession:
    """A child ``python -m pytest`` in its own session (signals to it never reach us)."""

    def __init__(self, tmp_path: Path, *, xdist: bool, backend: str) -> None:
        self.root = tmp_path / "child"
        self.markers = tmp_path / "markers"
        self.output = tmp_path / "child-output.txt"
        self.xdist = xdist
        self.backend = backend
        self.proc: subprocess.Popen[bytes] | None = None
        # Filled by hold(): what each holding process reported, every process of the session.
        self.held: list[Held] = []
        self.recorded: list[Recorded] = []

    def start(self) -> None:
        self.root.mkdir()
        self.markers.mkdir()
        (self.root / "pytest.ini").write_text(_CHILD_INI)
        (self.root / "conftest.py").write_text(_CHILD_CONFTEST)
        (self.root / "test_hold.py").write_text(_CHILD_TEST)
        # Nothing of this session's own configuration: its xdist identity above all (the child
        # would take itself for one of our workers), nor harness settings (external services).
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PYTEST_", "HARNESS_", "APP_", "CELERY_"))
        }
        env["LEAKCHECK_DIR"] = str(self.markers)
        for image in ("HARNESS_POSTGRES_IMAGE", "HARNESS_REDIS_IMAGE"):  # the engine's images
            if os.environ.get(image):
                env[image] = os.environ[image]
        argv = [
            sys.executable, "-m", "pytest", "test_hold.py", "-q",
            f"--services={self.backend}", f"--basetemp={self.root / 'basetemp'}",
        ]  # fmt: skip
        if self.xdist:
            # "each": both xdist workers run the test, so both hold servers at once.
            argv += ["-n", "2", "--dist", "each", "--max-worker-restart", "0"]
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=sigint_as_in_a_terminal,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self) -> str:
        try:
            text = self.output.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-_OUTPUT_TAIL_LINES:])

    def hold(self) -> None:
        """Wait until the servers are up, then record the session's processes."""
        self.held = self._wait_ready()
        self.recorded = _record(self.pid, self.held, local=self.backend == "local")
        if self.backend == "docker":
            for one in self.held:
                count = len(self.containers(one))
                assert count >= 2, f"expected postgres and redis containers of {one}, found {count}"

    def containers(self, *holders: Held) -> list[str]:
        """The containers owned by ``holders`` (default: every holding process) right now."""
        pids = {str(h.pid) for h in holders or self.held}
        return [c["name"] for c in our_containers(os.environ) if c[LABEL_OWNER_PID] in pids]

    def dirs(self, *holders: Held) -> list[Path]:
        """The services' temp dirs of ``holders`` (default: every holding process).

        The docker backend has none: its servers live in containers.
        """
        if self.backend == "docker":
            return []
        pids = [h.pid for h in holders or self.held]
        found = _dirs_of(pids)
        assert found, f"no {DIR_PREFIX}<pid>-* dir of pids {pids} in {default_workdir()}"
        return found

    def _wait_ready(self) -> list[Held]:
        """The marker of each holding process, once all of them wrote one."""
        assert self.proc is not None
        expected = 2 if self.xdist else 1
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            found = sorted(self.markers.glob("*.ready"))
            if len(found) >= expected:
                break
            code = self.proc.poll()
            if code is not None or time.monotonic() >= deadline:
                why = f"exited with code {code}" if code is not None else "timed out"
                pytest.fail(
                    f"the child session {why} before {expected} ready marker(s) appeared "
                    f"(found {len(found)}); its output:\n{self.tail()}"
                )
            time.sleep(_POLL_S)
        held = []
        for path in found:
            info = json.loads(path.read_text())
            held.append(Held(info["pid"], info["name"], tuple(info["worker_pids"])))
        return held

    def wait_exit(self) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the child session did not exit within {_EXIT_TIMEOUT_S:g} s; its output:\n"
                f"{self.tail()}"
            )

    def kill(self) -> None:
        """SIGKILL whatever is left of the session (cleanup, so a failure leaks nothing)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # never hide the test's failure
            self.proc.wait(timeout=10)
        for one in self.recorded:  # servers and workers run in sessions of their own
            if one.alive():
                with contextlib.suppress(psutil.Error):
                    one.proc.kill()


def _record(pid: int, held: list[Held], *, local: bool) -> list[Recorded]:
    """Every process of the child session now, checked to include what it must hold."""
    root = psutil.Process(pid)
    recorded = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            ancestors = tuple(a.pid for a in proc.parents())
        except psutil.NoSuchProcess:  # came and went (a short-lived Postgres backend)
            continue
        recorded.append(Recorded(proc, _describe(proc), ancestors))
    pids = {r.proc.pid for r in recorded}
    names = [_name(r.proc) for r in recorded]
    # Without these the test would pass while proving nothing.
    for one in held:
        assert one.pid in pids, f"{one.name} (pid {one.pid}) is not a process of the child"
        assert len(one.worker_pids) >= _WORKER_PROCESSES, (
            f"{one.name}'s prefork worker has processes {one.worker_pids}, expected a main "
            "process and its children"
        )
        assert set(one.worker_pids) <= pids, (
            f"{one.name}'s worker processes {one.worker_pids} are not all under the child"
        )
    for server in ("postgres", "redis-server") if local else ():
        count = sum(server in name for name in names)
        assert count >= len(held), f"expected a {server} per holding process, found {count}"
    return recorded


def _dirs_of(pids: list[int]) -> list[Path]:
    workdir = default_workdir()
    return sorted(p for pid in pids for p in workdir.glob(f"{DIR_PREFIX}{pid}-*"))


def _wait_gone(recorded: list[Recorded]) -> list[Recorded]:
    """The recorded processes still alive after the deadline (zombies count as gone)."""
    deadline = time.monotonic() + _GONE_TIMEOUT_S
    while True:
        alive = [r for r in recorded if r.alive()]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(_POLL_S)


def _strays(marker: Path) -> list[str]:
    """Processes whose command line names this test's temp dir (started after the snapshot)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(marker) in cmdline and proc.pid != os.getpid():
            found.append(_describe(proc))
    return found


_BACKENDS: Final = [
    pytest.param("local", id="local"),
    # A missing engine is a failure here: the docker tier runs only where one answers.
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
]


@pytest.fixture(params=_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The services backend of the child session."""
    name: str = request.param
    probe = (probe_docker if name == "docker" else probe_local)(os.environ)
    if name == "local" and not probe.ok:
        pytest.skip(f"the leak check needs the local services backend: {probe.detail}")
    assert probe.ok, f"the docker leak check needs an engine: {probe.detail}; {probe.fix}"
    return name


@pytest.fixture
def start_child(tmp_path: Path, backend: str) -> Iterator[Callable[[bool], ChildSession]]:
    """Starts a child session (with xdist or not) and returns it once its servers are up."""
    started: list[ChildSession] = []

    def start(xdist: bool) -> ChildSession:
        session = ChildSession(tmp_path, xdist=xdist, backend=backend)
        started.append(session)
        session.start()
        session.hold()
        return session

    try:
        yield start
    finally:
        for session in started:
            session.kill()


def _assert_nothing_left(session: ChildSession, *, how: str) -> None:
    alive = _wait_gone(session.recorded)
    strays = _strays(session.root)
    assert not alive and not strays, (
        f"after {how}, processes of the child session are still alive "
        f"{_GONE_TIMEOUT_S:g} s after it ended:\n"
        + "\n".join(f"  {r.description}" for r in alive)
        + "".join(f"\n  (started later) {s}" for s in strays)
        + f"\nits output:\n{session.tail()}"
    )


def _assert_no_containers(session: ChildSession, *holders: Held, how: str) -> None:
    if session.backend != "docker":
        return
    left = session.containers(*holders)
    assert not left, f"after {how}, containers of the child session remain: {left}"


def _assert_swept(session: ChildSession, dirs: list[Path]) -> None:
    """A killed process's dirs (local) or containers (docker) stay, since no teardown ran;
    the next services start removes them."""
    if session.backend == "docker":
        with ServiceStack("docker"):
            pass
        _assert_no_containers(session, how="the next docker session's start")
        return
    with LocalRedis():
        pass
    left = [p for p in dirs if p.exists()]
    assert not left, f"the next services start did not sweep the dead session's dirs: {left}"


@pytest.mark.parametrize(
    ("sig", "to_group", "xdist"),
    [
        # Ctrl-C in a terminal: the whole foreground process group (pytest and xdist workers;
        # servers and Celery workers run in sessions of their own and are not signalled).
        pytest.param(signal.SIGINT, True, False, id="sigint-group"),
        pytest.param(signal.SIGINT, True, True, id="sigint-group-xdist"),
        # `kill`, a CI timeout: the main process only; under xdist its workers are then
        # interrupted by execnet (after its 5 s grace) when the controller shuts them down.
        pytest.param(signal.SIGTERM, False, False, id="sigterm-main"),
        pytest.param(signal.SIGTERM, False, True, id="sigterm-main-xdist"),
    ],
)
def test_signalled_session_leaves_nothing(
    start_child: Callable[[bool], ChildSession], sig: signal.Signals, to_group: bool, xdist: bool
) -> None:
    session = start_child(xdist)
    dirs = session.dirs()

    if to_group:
        os.killpg(session.pid, sig)
    else:
        os.kill(session.pid, sig)
    code = session.wait_exit()

    assert code == pytest.ExitCode.INTERRUPTED, (
        f"after {sig.name} the child exited with {code}, expected "
        f"{int(pytest.ExitCode.INTERRUPTED)} (interrupted, after its teardown); its output:\n"
        f"{session.tail()}"
    )
    _assert_nothing_left(session, how=sig.name)
    left = [p for p in dirs if p.exists()]
    if left and xdist and not to_group:
        # execnet gives each xdist worker 5 s to finish its teardown, then kills it: on a busy
        # machine (load 9-13 in a CI run) stopping its Postgres, Redis and Celery workers took
        # longer. Its processes are gone (asserted above, by the parent-death signal); its dirs
        # are a killed process's, which the next services start removes, as after a SIGKILL.
        _assert_swept(session, left)
        left = []
    assert not left, f"after {sig.name} the session's temp dirs remain: {left}"
    _assert_no_containers(session, how=sig.name)


def test_killed_xdist_worker_leaves_nothing(
    start_child: Callable[[bool], ChildSession],
) -> None:
    session = start_child(True)
    victim, survivor = session.held
    victim_dirs, survivor_dirs = session.dirs(victim), session.dirs(survivor)
    orphans = [r for r in session.recorded if victim.pid in r.ancestors]
    assert orphans, f"recorded no process under {victim.name} (pid {victim.pid})"

    os.kill(victim.pid, signal.SIGKILL)
    # Its servers and worker must die with it (parent-death signal) while the session goes on:
    # nothing else would stop them before the session ends.
    alive = _wait_gone(orphans)
    assert not alive, f"killing {victim.name} left its processes alive:\n" + "\n".join(
        f"  {r.description}" for r in alive
    )
    assert session.proc is not None and session.proc.poll() is None, "the session ended early"
    (session.markers / "release").touch()
    session.wait_exit()

    _assert_nothing_left(session, how=f"SIGKILL of {victim.name}")
    left = [p for p in survivor_dirs if p.exists()]
    assert not left, f"{survivor.name} ended normally but its temp dirs remain: {left}"
    # The survivor's stop removes what its killed sibling left, before the session ends.
    _assert_no_containers(session, how=f"SIGKILL of {victim.name} and the session's end")
    _assert_swept(session, victim_dirs)


def test_killed_session_leaves_nothing(start_child: Callable[[bool], ChildSession]) -> None:
    session = start_child(False)
    dirs = session.dirs()

    os.kill(session.pid, signal.SIGKILL)
    assert session.wait_exit() == -signal.SIGKILL
    _assert_nothing_left(session, how="SIGKILL of the session")
    _assert_swept(session, dirs)
