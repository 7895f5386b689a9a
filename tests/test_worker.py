"""CeleryWorkerProcess against a real worker process, Redis, Postgres and the marketplace.

One solo worker serves most tests (and every loop mode); tests that change the worker's
environment, pool or fate start their own. Runs are inserted directly in ``ingest_runs``.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from harness.core import pythons
from harness.core.cell import mode_applies
from harness.core.logs import (
    CLOSED_CHECK_OK_TEMPLATE,
    COMPLETED_TEMPLATE,
    FAILED_TEMPLATE,
    FORBIDDEN_TEXT,
    IDLE_CHECK_OK_TEMPLATE,
    IDLE_CHECK_RE,
    INHERITED_CHECK_OK_TEMPLATE,
    LOOP_MODE_TEMPLATE,
    STARTING_TEMPLATE,
    LogLine,
    find_forbidden,
    harness_lines,
    runner_lines,
    task_lines,
)
from harness.core.runs import RunRow, RunStore
from harness.pytest.deadline import hang_report
from harness.workers.forkserver import ForkServer, fork_server_settings
from harness.workers.jobfaults import JOB_FAULT_HEADER
from harness.workers.loopmodes import LOOP_MODES, LoopModeError, expected_runner_line
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess, WorkerStartError, app_env, mask_secrets

integration = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent

HEADER_SOURCE = "header harness_loop_mode"
PRE_FIX_ERROR = f"RuntimeError: {FORBIDDEN_TEXT}"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_env(
    database_url: str, redis_url: str, marketplace_server: MarketplaceServer
) -> dict[str, str]:
    return app_env(
        database_url=database_url, broker_url=redis_url, marketplace_url=marketplace_server.url
    )


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="module")
def solo_worker(worker_env: dict[str, str], log_dir: Path) -> Iterator[CeleryWorkerProcess]:
    with CeleryWorkerProcess(env=worker_env, log_dir=log_dir) as worker:
        yield worker


@pytest.fixture(scope="module")
def module_fork_server() -> Iterator[ForkServer]:
    server = ForkServer(**fork_server_settings()).start()
    yield server
    server.stop()


@pytest.fixture(params=["exec", "fork"])
def make_worker(
    request: pytest.FixtureRequest, worker_env: dict[str, str], log_dir: Path
) -> Iterator[Callable[..., CeleryWorkerProcess]]:
    """``CeleryWorkerProcess(env=worker_env, log_dir=log_dir, **kwargs)``, exec'ed or forked
    from a fork server (the farm's way): the process guarantees hold either way."""
    how: str = request.param
    server = request.getfixturevalue("module_fork_server") if how == "fork" else None
    made: list[CeleryWorkerProcess] = []

    def make(**kwargs: Any) -> CeleryWorkerProcess:
        worker = CeleryWorkerProcess(env=worker_env, log_dir=log_dir, fork_server=server, **kwargs)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.kill()
    started = [w.started_by for w in made if w.started_by is not None]
    assert started and set(started) == {how}, f"workers were started by {started}, not {how}"


@pytest.fixture
def runs(clean_db: str) -> Iterator[RunStore]:
    with RunStore(clean_db) as store:
        yield store


# -- helpers ---------------------------------------------------------------------------------


def run_in_worker(
    worker: CeleryWorkerProcess,
    runs: RunStore,
    modes: Mapping[int, str | None],
    *,
    marketplace_code: str,
    job_code: str = "frontend_prices",
) -> dict[int, tuple[RunRow, list[LogLine]]]:
    """Create one run per entry (project id -> loop mode), send them all, wait for each."""
    mark = worker.log_mark()
    sent = {}
    for project_id, mode in modes.items():
        run_id = runs.create(
            project_id=project_id, marketplace_code=marketplace_code, job_code=job_code
        )
        sent[project_id] = (run_id, worker.send(run_id, loop_mode=mode))
    results = {}
    for project_id, (run_id, task_id) in sent.items():
        row = runs.wait_terminal(run_id, timeout=20)
        # The row is finished before the task writes its last lines: wait for Celery's.
        lines = worker.wait_for_task(task_id, since=mark)
        results[project_id] = (row, lines)
    return results


def assert_mode_log(
    lines: list[LogLine],
    row: RunRow,
    mode: str,
    *,
    source: str = HEADER_SOURCE,
) -> None:
    """The run's lines are the runbook's, with the runner line ``mode`` must produce."""
    run_id = row.id
    end = (
        COMPLETED_TEMPLATE.format(run_id=run_id)
        if row.status == "success"
        else FAILED_TEMPLATE.format(run_id=run_id, error=row.error_message)
    )
    assert [line.message for line in task_lines(lines, run_id)] == [
        STARTING_TEMPLATE.format(run_id=run_id),
        end,
    ]
    [runner] = runner_lines(lines, run_id)
    assert runner.line.level == "INFO"
    assert (runner.detected_running_loop, runner.strategy) == expected_runner_line(mode)
    assert runner.context == {"run_id": run_id, "job_code": row.job_code}
    shim = [line.message for line in harness_lines(lines, run_id)]
    assert shim[0] == LOOP_MODE_TEMPLATE.format(run_id=run_id, mode=mode, source=source)
    if mode == "idle_loop":
        assert shim[1:] == [IDLE_CHECK_OK_TEMPLATE.format(run_id=run_id)]
    elif mode == "closed_loop":
        assert shim[1:] == [CLOSED_CHECK_OK_TEMPLATE.format(run_id=run_id)]
    elif mode == "inherited_loop":
        assert shim[1:] == [INHERITED_CHECK_OK_TEMPLATE.format(run_id=run_id)]
    else:
        assert shim[1:] == []
    assert find_forbidden(lines) == []


def assert_success(row: RunRow) -> None:
    assert row.status == "success", row.error_message
    assert row.error_message is None
    assert row.finished_at is not None
    assert row.duration_ms is not None
    assert row.stats_json is not None
    assert row.stats_json["ok"] is True


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for init to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float = 3.0) -> list[int]:
    """The pids still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if not gone(pid)]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return alive


def broker_keys(redis_url: str, queue: str) -> list[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        return list(client.scan_iter(match=f"*{queue}*"))
    finally:
        client.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- without a worker process ----------------------------------------------------------------


def test_mask_secrets_hides_url_passwords_only() -> None:
    text = "redis://user:s3cr%40t@h:6379/0 and postgresql+psycopg2://postgres@db/x redis://:pw@h"

    assert mask_secrets(text) == (
        "redis://user:***@h:6379/0 and postgresql+psycopg2://postgres@db/x redis://:***@h"
    )
    assert mask_secrets("http://127.0.0.1:8081/api") == "http://127.0.0.1:8081/api"


def test_environment_carries_only_the_given_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://leaked@elsewhere/db")
    monkeypatch.setenv("HARNESS_RUNNER", "prefix")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://leaked")
    env = app_env(database_url="postgresql://a@b/c", broker_url="redis://b", marketplace_url="m")

    worker = CeleryWorkerProcess(
        env=env, log_dir=tmp_path, extra_env={"HARNESS_DEFAULT_LOOP_MODE": "idle_loop"}
    )

    assert worker.env["APP_DATABASE_URL"] == "postgresql://a@b/c"
    assert worker.env["APP_HEARTBEAT_INTERVAL_S"] == "1"
    assert worker.env["HARNESS_DEFAULT_LOOP_MODE"] == "idle_loop"
    assert worker.env["PYTHONUNBUFFERED"] == "1"
    assert worker.env["PATH"]
    assert "HARNESS_RUNNER" not in worker.env
    assert "CELERY_BROKER_URL" not in worker.env


def test_names_are_unique_and_carry_the_xdist_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    env = {"APP_BROKER_URL": "redis://b"}

    one = CeleryWorkerProcess(env=env, log_dir=tmp_path)
    two = CeleryWorkerProcess(env=env, log_dir=tmp_path)

    assert one.queue.startswith("harness-gw3-")
    assert one.queue != two.queue
    assert one.node_name == f"{one.queue}@{socket.gethostname()}"
    assert one.log_path != two.log_path
    assert one.log_path.parent == tmp_path.resolve()
    cmd = one.command
    assert cmd[cmd.index("-Q") + 1] == one.queue
    assert cmd[cmd.index("-n") + 1] == one.node_name
    assert {"--without-gossip", "--without-mingle", "--without-heartbeat"} <= set(cmd)


def test_bad_arguments_are_rejected_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="APP_BROKER_URL"):
        CeleryWorkerProcess(env={}, log_dir=tmp_path)
    worker = CeleryWorkerProcess(env={"APP_BROKER_URL": "redis://b"}, log_dir=tmp_path)
    with pytest.raises(LoopModeError, match="in_process"):
        worker.send(1, loop_mode="in_process")
    with pytest.raises(RuntimeError, match="start"):
        worker.send(1)
    worker.stop()  # never started: nothing to do


# -- one shared worker -----------------------------------------------------------------------


@integration
def test_start_means_it_answers_a_ping(solo_worker: CeleryWorkerProcess) -> None:
    assert solo_worker.is_alive()
    assert solo_worker.ping()
    assert solo_worker.start_s is not None
    assert any(line.message.endswith(" ready.") for line in solo_worker.log_lines())
    assert any(
        line.message.startswith("harness worker app: runner=fixed, default loop mode=no_loop")
        for line in solo_worker.log_lines()
    )


@integration
@pytest.mark.parametrize("mode", [m for m in LOOP_MODES if mode_applies(m, "solo")])
def test_a_run_in_each_loop_mode(
    solo_worker: CeleryWorkerProcess,
    runs: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    mode: str,
) -> None:
    [(row, lines)] = run_in_worker(
        solo_worker, runs, {1: mode}, marketplace_code=marketplace_code
    ).values()

    assert_success(row)
    assert_mode_log(lines, row, mode)


@integration
def test_one_worker_process_serves_every_mode_in_a_row(
    solo_worker: CeleryWorkerProcess,
    runs: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
) -> None:
    pid = solo_worker.pid
    modes = dict(enumerate([m for m in LOOP_MODES if mode_applies(m, "solo")], start=1))

    results = run_in_worker(solo_worker, runs, modes, marketplace_code=marketplace_code)

    assert solo_worker.pid == pid
    assert solo_worker.is_alive()
    for project_id, (row, lines) in results.items():
        assert_success(row)
        assert_mode_log(lines, row, modes[project_id])


@integration
def test_a_failing_run_is_finished_and_logged(
    solo_worker: CeleryWorkerProcess, runs: RunStore, marketplace_code: str
) -> None:
    [(row, lines)] = run_in_worker(
        solo_worker,
        runs,
        {1: "running_loop"},
        marketplace_code=marketplace_code,
        job_code="no_such_job",
    ).values()

    assert row.status == "failed"
    assert row.error_message is not None
    assert row.error_message.startswith("UnknownJobError: unknown job_code 'no_such_job'")
    assert row.finished_at is not None
    assert row.duration_ms is not None
    assert_mode_log(lines, row, "running_loop")
    [failed] = task_lines(lines, row.id)[1:]
    assert failed.level == "ERROR"


# -- workers of their own --------------------------------------------------------------------


@integration
def test_an_idle_worker_is_killed_at_once_and_a_busy_one_is_stopped_warm(
    make_worker: Callable[..., CeleryWorkerProcess],
    worker_env: dict[str, str],
    runs: RunStore,
    marketplace_code: str,
) -> None:
    """``stop(kill_if_idle=True)``, the farm's: no warm shutdown's waits for a worker with
    nothing to do, but one holding a task (here one scheduled for later) is stopped warm."""
    idle = make_worker(pool="prefork").start()
    pids = idle.group_pids()
    assert idle.idle()
    idle.stop(kill_if_idle=True)
    assert idle.returncode == -signal.SIGKILL  # killed, not a warm shutdown's exit 0
    assert wait_gone(pids) == []
    assert broker_keys(worker_env["APP_BROKER_URL"], idle.queue) == []  # its queue is deleted

    busy = make_worker(pool="solo").start()
    try:
        run_id = runs.create(project_id=1, marketplace_code=marketplace_code)
        busy.send(run_id, loop_mode="no_loop", countdown=60)
        deadline = time.monotonic() + 10
        while busy.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not busy.idle(), "a worker holding a scheduled task is not idle"
    finally:
        busy.stop(kill_if_idle=True)
    assert busy.returncode == 0, "the busy worker was not stopped warm"


@integration
@pytest.mark.parametrize("pool", ["solo", "prefork", "threads"])
def test_a_hung_run_is_in_the_workers_stacks_of_a_hang_report(
    worker_env: dict[str, str], log_dir: Path, runs: RunStore, marketplace_code: str, pool: str
) -> None:
    """What a test that passes its deadline reports: the stacks of the worker holding the run,
    down to the job's blocking call, in the process (prefork: the pool's) that runs it."""
    worker = CeleryWorkerProcess(env=worker_env, log_dir=log_dir, pool=pool).start()
    try:
        run_id = runs.create(project_id=1, marketplace_code=marketplace_code)
        worker.send(run_id, loop_mode="running_loop", headers={JOB_FAULT_HEADER: "hang"})
        report = ""
        for _ in range(100):  # the job blocks FAULT_AFTER_S after it starts
            report = hang_report("t.py::test (call)", 1.0)
            if "hang_here" in report:
                break
            time.sleep(0.1)
        assert f"=== Celery worker {worker.node_name} (pool {pool})" in report, report
        worker_part = report.split(f"=== Celery worker {worker.node_name}", 1)[1]
        process = "pool process" if pool == "prefork" else "main process"
        stuck = [block for block in worker_part.split("--- ") if "hang_here" in block]
        assert stuck and stuck[0].startswith(process), worker_part
        # Down the job's own call chain: the runner, the job's coroutine, the blocking call.
        assert "in _faulty" in stuck[0] and "jobfaults.py" in stuck[0], stuck[0]
        assert "asyncio" in stuck[0], stuck[0]
        assert worker.is_alive(), "taking the stacks must not kill the worker"
    finally:
        worker.kill()
    # Gone with the worker: a later hang report does not ask it.
    assert worker.node_name not in hang_report("t", 1.0)


@integration
def test_without_a_header_the_worker_default_applies(
    worker_env: dict[str, str],
    log_dir: Path,
    runs: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
) -> None:
    with CeleryWorkerProcess(
        env=worker_env,
        log_dir=log_dir,
        extra_env={"HARNESS_DEFAULT_LOOP_MODE": "running_uvloop"},
    ) as worker:
        results = run_in_worker(
            worker, runs, {1: None, 2: "no_loop"}, marketplace_code=marketplace_code
        )

    (default_row, default_lines), (header_row, header_lines) = results[1], results[2]
    assert_success(default_row)
    assert_mode_log(
        default_lines, default_row, "running_uvloop", source="HARNESS_DEFAULT_LOOP_MODE"
    )
    assert_success(header_row)
    assert_mode_log(header_lines, header_row, "no_loop")


@integration
def test_the_pre_fix_runner_fails_every_running_mode(
    worker_env: dict[str, str],
    log_dir: Path,
    runs: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
) -> None:
    modes = dict(enumerate([m for m in LOOP_MODES if mode_applies(m, "solo")], start=1))
    with CeleryWorkerProcess(
        env=worker_env, log_dir=log_dir, extra_env={"HARNESS_RUNNER": "prefix"}
    ) as worker:
        results = run_in_worker(worker, runs, modes, marketplace_code=marketplace_code)
        assert any(
            line.message.startswith("harness worker app: runner=prefix")
            for line in worker.log_lines()
        )

    for project_id, (row, lines) in results.items():
        mode = modes[project_id]
        # The old runner logged nothing: the missing line is itself a finding.
        assert runner_lines(lines, row.id) == []
        messages = [line.message for line in task_lines(lines, row.id)]
        if mode.startswith("running"):
            assert row.status == "failed"
            assert row.error_message == PRE_FIX_ERROR
            assert messages == [
                STARTING_TEMPLATE.format(run_id=row.id),
                FAILED_TEMPLATE.format(run_id=row.id, error=PRE_FIX_ERROR),
            ]
            assert find_forbidden(task_lines(lines, row.id))
        else:
            assert_success(row)
            assert messages[-1] == COMPLETED_TEMPLATE.format(run_id=row.id)
    # asyncio.run() also clobbers a loop that was set but idle: the shim's check sees it.
    idle_row, idle_lines = results[2]
    [check] = [
        line for line in harness_lines(idle_lines, idle_row.id) if IDLE_CHECK_RE.match(line.message)
    ]
    assert check.level == "ERROR"
    assert "replaced or closed" in check.message


@integration
@pytest.mark.parametrize("pool", ["solo", "threads", "prefork"])
def test_each_pool_starts_runs_every_mode_and_stops(
    make_worker: Callable[..., CeleryWorkerProcess],
    runs: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    redis_url: str,
    pool: str,
) -> None:
    modes = dict(enumerate([m for m in LOOP_MODES if mode_applies(m, pool)], start=1))
    worker = make_worker(pool=pool, concurrency=2)
    with worker:
        results = run_in_worker(worker, runs, modes, marketplace_code=marketplace_code)
        pids = worker.group_pids()
        assert len(pids) == (3 if pool == "prefork" else 1)

    for project_id, (row, lines) in results.items():
        assert_success(row)
        assert_mode_log(lines, row, modes[project_id])
    assert worker.start_s is not None
    assert worker.stop_s is not None
    assert worker.returncode == 0
    assert wait_gone(pids, timeout=0) == []
    assert broker_keys(redis_url, worker.queue) == []  # its queue is gone from the broker
    # Warm shutdown: ~0.1 s on solo and threads (a 1 s broker poll or event-loop wait would
    # show here); prefork's own pool join takes ~1.5 s. start_s is not asserted: it is the
    # worker's boot (imports, ~0.5 s idle), which CPU contention stretches to seconds.
    assert worker.stop_s < (1.0 if pool in ("solo", "threads") else 4.0)


@integration
def test_stop_leaves_no_process_of_a_prefork_worker(
    make_worker: Callable[..., CeleryWorkerProcess], worker_env: dict[str, str]
) -> None:
    worker = make_worker(pool="prefork", concurrency=2)
    worker.start()
    children = [child.pid for child in psutil.Process(worker.pid).children(recursive=True)]
    assert len(children) == 2
    assert sorted(worker.group_pids()) == sorted([worker.pid, *children])

    worker.stop()

    assert not worker.is_alive()
    assert worker.returncode == 0
    assert wait_gone([worker.pid, *children], timeout=0) == []
    assert worker.group_pids() == []
    worker.stop()  # idempotent


@integration
def test_kill_sigkills_the_whole_group(
    make_worker: Callable[..., CeleryWorkerProcess], worker_env: dict[str, str]
) -> None:
    worker = make_worker(pool="prefork", concurrency=2)
    worker.start()
    pids = worker.group_pids()
    assert len(pids) == 3

    worker.kill()

    assert worker.returncode == -signal.SIGKILL
    assert not worker.is_alive()
    assert wait_gone(pids, timeout=0) == []
    worker.stop()  # nothing left to stop


@integration
def test_prefork_children_die_with_the_main_worker(
    make_worker: Callable[..., CeleryWorkerProcess], worker_env: dict[str, str]
) -> None:
    worker = make_worker(pool="prefork", concurrency=2)
    with worker:
        children = [child.pid for child in psutil.Process(worker.pid).children()]
        assert len(children) == 2

        worker.kill(signal.SIGKILL, group=False)  # only the main process

        assert worker.returncode == -signal.SIGKILL
        # Celery arms a parent-death signal in each child: none is left as an orphan.
        assert wait_gone(children, timeout=5.0) == []


@integration
def test_stop_kills_a_worker_that_misses_the_deadline(
    make_worker: Callable[..., CeleryWorkerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "harness.worker")
    worker = make_worker()
    worker.start()
    worker.kill(signal.SIGSTOP, group=False)  # frozen: SIGTERM stays pending

    worker.stop(timeout=0.3)

    assert worker.returncode == -signal.SIGKILL
    assert worker.stop_s is not None
    assert 0.3 <= worker.stop_s < 3.0  # the deadline, not the default 10 s
    assert "did not finish its warm shutdown within 0.3 s" in caplog.text
    assert worker.group_pids() == []


@integration
def test_an_app_that_cannot_be_imported_fails_the_start(
    make_worker: Callable[..., CeleryWorkerProcess], worker_env: dict[str, str]
) -> None:
    worker = make_worker(app="harness.no_such_module")

    with pytest.raises(WorkerStartError) as caught:
        worker.start()

    error = caught.value
    message = str(error)
    assert "exited with code" in message
    assert "-A harness.no_such_module worker" in message
    assert "The module harness.no_such_module was not found" in message
    assert "Hint:" in message
    assert error.returncode not in (None, 0)
    assert any("harness.no_such_module" in line for line in error.log_tail)
    assert not worker.is_alive()
    assert worker.group_pids() == []


@integration
def test_an_unreachable_broker_fails_the_start_with_the_password_masked(
    worker_env: dict[str, str], log_dir: Path
) -> None:
    env = {**worker_env, "APP_BROKER_URL": f"redis://user:s3cret@127.0.0.1:{closed_port()}/0"}
    worker = CeleryWorkerProcess(env=env, log_dir=log_dir, start_timeout=2.0)

    started = time.monotonic()
    with pytest.raises(WorkerStartError) as caught:
        worker.start()
    elapsed = time.monotonic() - started

    message = str(caught.value)
    assert "did not answer a control ping within 2 s" in message
    assert "Connection refused" in message
    assert "redis://user:***@127.0.0.1" in message
    assert "s3cret" not in message
    assert "Hint:" in message
    assert elapsed < 6.0  # the deadline plus about one ping: no endless retrying
    assert worker.returncode == -signal.SIGKILL
    assert worker.group_pids() == []


@integration
@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_a_worker_runs_on_the_interpreter_python_names(
    worker_env: dict[str, str],
    log_dir: Path,
    runs: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    monkeypatch: pytest.MonkeyPatch,
    version: str,
) -> None:
    """--python: the workers' venv on that CPython, built once (``~/.cache``), runs every mode."""
    if pythons.find_interpreter(version) is None:
        pytest.skip(f"no CPython {version} on this machine")
    python = pythons.worker_python(version, root=ROOT, cache=pythons.default_cache())
    monkeypatch.setenv(pythons.WORKER_PYTHON_ENV, str(python))
    modes = dict(enumerate(["no_loop", "closed_loop", "running_loop"], start=1))
    with CeleryWorkerProcess(env=worker_env, log_dir=log_dir, pool="solo") as worker:
        assert worker.command[0] == str(python)
        results = run_in_worker(worker, runs, modes, marketplace_code=marketplace_code)
        said = [
            line.message
            for line in worker.log_lines()
            if line.message.startswith("harness worker app: ")
        ]
    assert len(said) == 1 and f", Python {version}." in said[0], said
    for project_id, (row, lines) in results.items():
        assert_success(row)
        assert_mode_log(lines, row, modes[project_id])
