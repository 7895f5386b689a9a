"""harness.workers.loopmodes in-process: each mode's condition as the task body sees it."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop
from celery.app.task import Context

from app.utils.asyncio_runner import run_async_safe
from harness.core.logs import (
    CLOSED_CHECK_RE,
    IDLE_CHECK_RE,
    RUNNER_RE,
    STRATEGY_ASYNCIO_RUN,
    STRATEGY_THREAD_POOL,
)
from harness.workers.loopmodes import (
    DEFAULT_MODE_ENV,
    IN_PROCESS,
    LOOP_MODE_HEADER,
    LOOP_MODES,
    MATRIX_MODES,
    LoopMode,
    LoopModeError,
    expected_runner_line,
    loop_mode_for_request,
    parse_loop_mode,
    run_in_mode,
)
from tests._children import run_program


@pytest.fixture(autouse=True)
def _no_loop_left_behind() -> Iterator[None]:
    # Start as a worker thread starts: no loop set (so get_event_loop() never creates one).
    asyncio.set_event_loop(None)
    yield
    # Every mode must leave the thread as the worker has it: no loop set, none running.
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    with pytest.raises(RuntimeError, match="no current event loop"):
        asyncio.get_event_loop()


def _loop_state() -> dict[str, Any]:
    """What the task body can see of the thread's event loops."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_event_loop()
    except RuntimeError:
        current = None
    return {"running": running, "current": current}


# Every mode but the fork-inherited loop, which needs a forked child of a worker parent.
IN_THIS_PROCESS = tuple(mode for mode in LOOP_MODES if mode != "inherited_loop")


def _idle_checks(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (record.levelname, record.getMessage())
        for record in caplog.records
        if record.name == "harness.loopmodes" and IDLE_CHECK_RE.match(record.getMessage())
    ]


def test_the_modes_and_the_matrix() -> None:
    assert LOOP_MODES == (
        "no_loop",
        "idle_loop",
        "closed_loop",
        "inherited_loop",
        "running_loop",
        "running_uvloop",
    )
    assert IN_PROCESS == "in_process"
    assert MATRIX_MODES[:-1] == LOOP_MODES
    assert MATRIX_MODES[-1] == "in_process"
    assert [parse_loop_mode(mode) for mode in LOOP_MODES] == list(LoopMode)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("no_loop", (False, STRATEGY_ASYNCIO_RUN)),
        ("idle_loop", (False, STRATEGY_ASYNCIO_RUN)),
        ("closed_loop", (False, STRATEGY_ASYNCIO_RUN)),
        ("inherited_loop", (False, STRATEGY_ASYNCIO_RUN)),
        ("running_loop", (True, STRATEGY_THREAD_POOL)),
        ("running_uvloop", (True, STRATEGY_THREAD_POOL)),
        ("in_process", (True, STRATEGY_THREAD_POOL)),
    ],
)
def test_expected_runner_line(mode: str, expected: tuple[bool, str]) -> None:
    assert expected_runner_line(mode) == expected


def test_unknown_modes_name_the_valid_ones() -> None:
    with pytest.raises(LoopModeError, match="valid worker loop modes: no_loop, idle_loop"):
        parse_loop_mode("running")
    with pytest.raises(LoopModeError, match="run by the test itself"):
        parse_loop_mode(IN_PROCESS)
    with pytest.raises(LoopModeError, match="in_process"):
        expected_runner_line("nope")


def test_no_loop_clears_a_loop_that_was_set() -> None:
    stale = asyncio.new_event_loop()
    asyncio.set_event_loop(stale)
    try:
        state = run_in_mode("no_loop", _loop_state)
    finally:
        stale.close()

    assert state == {"running": None, "current": None}


def test_idle_loop_sets_a_loop_that_is_not_running(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "harness.loopmodes")

    state = run_in_mode(LoopMode.IDLE_LOOP, _loop_state, run_id=123)

    assert state["running"] is None
    loop = state["current"]
    assert isinstance(loop, asyncio.AbstractEventLoop)
    assert loop.is_closed()  # run_in_mode closes its loop once the check is done
    assert _idle_checks(caplog) == [("INFO", "idle loop check for run 123: still set and open")]


@pytest.mark.parametrize(
    ("clobber", "detail"),
    [
        (lambda: asyncio.get_event_loop().close(), "the loop was closed"),
        (lambda: asyncio.set_event_loop(None), "no loop is set for the thread any more"),
        # asyncio.run() itself does this: it sets its own loop, then None.
        (lambda: asyncio.run(asyncio.sleep(0)), "no loop is set for the thread any more"),
    ],
)
def test_idle_loop_check_reports_a_clobbered_loop(
    caplog: pytest.LogCaptureFixture, clobber: Callable[[], None], detail: str
) -> None:
    caplog.set_level(logging.INFO, "harness.loopmodes")

    run_in_mode("idle_loop", clobber, run_id=9)

    assert _idle_checks(caplog) == [
        ("ERROR", f"idle loop check for run 9: replaced or closed ({detail})")
    ]


def test_idle_loop_check_reports_a_replaced_loop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "harness.loopmodes")
    other = asyncio.new_event_loop()
    try:
        run_in_mode("idle_loop", asyncio.set_event_loop, other, run_id=4)
    finally:
        other.close()

    [(level, message)] = _idle_checks(caplog)
    assert level == "ERROR"
    assert message.startswith("idle loop check for run 4: replaced or closed (the thread's loop")


def test_idle_loop_check_runs_when_the_body_raises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "harness.loopmodes")

    def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        run_in_mode("idle_loop", boom)

    [(level, message)] = _idle_checks(caplog)
    assert level == "INFO"
    assert "boom" in message  # labelled with the function when no run_id is given


def _another_closed_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.close()
    return loop


def _closed_checks(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "harness.loopmodes" and CLOSED_CHECK_RE.match(r.getMessage())
    ]


def test_closed_loop_sets_a_loop_that_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "harness.loopmodes")

    state = run_in_mode(LoopMode.CLOSED_LOOP, _loop_state, run_id=31)

    assert state["running"] is None
    loop = state["current"]
    assert isinstance(loop, asyncio.AbstractEventLoop) and loop.is_closed()
    assert _closed_checks(caplog) == [
        ("INFO", "closed loop check for run 31: still set, and closed")
    ]
    # The fixed runner leaves it exactly as it found it.
    caplog.clear()
    run_in_mode("closed_loop", run_async_safe, asyncio.sleep(0, "done"), run_id=32)
    assert _closed_checks(caplog) == [
        ("INFO", "closed loop check for run 32: still set, and closed")
    ]


@pytest.mark.parametrize(
    ("clobber", "detail"),
    [
        (lambda: asyncio.set_event_loop(None), "no loop is set for the thread any more"),
        # asyncio.run() itself does this: it sets its own loop, then None.
        (lambda: asyncio.run(asyncio.sleep(0)), "no loop is set for the thread any more"),
        (
            lambda: asyncio.set_event_loop(_another_closed_loop()),
            "the thread's loop was replaced",
        ),
    ],
)
def test_closed_loop_check_reports_a_changed_loop(
    caplog: pytest.LogCaptureFixture, clobber: Callable[[], None], detail: str
) -> None:
    caplog.set_level(logging.INFO, "harness.loopmodes")

    run_in_mode("closed_loop", clobber, run_id=8)

    [(level, message)] = _closed_checks(caplog)
    assert level == "ERROR"
    assert message.startswith(f"closed loop check for run 8: changed ({detail}"), message


def test_running_loop_calls_the_body_inside_a_running_asyncio_loop() -> None:
    state = run_in_mode("running_loop", _loop_state)

    loop = state["running"]
    assert loop is not None
    assert not isinstance(loop, uvloop.Loop)
    assert state["current"] is loop


def test_running_uvloop_calls_the_body_inside_a_running_uvloop() -> None:
    state = run_in_mode("running_uvloop", _loop_state)

    assert isinstance(state["running"], uvloop.Loop)


@pytest.mark.parametrize("mode", ["running_loop", "running_uvloop"])
def test_running_modes_reproduce_the_pre_fix_bug(mode: str) -> None:
    async def job() -> int:
        return 1

    def pre_fix_body() -> int:
        coro = job()
        try:
            return asyncio.run(coro)
        finally:
            coro.close()  # asyncio.run refused it; closing avoids a "never awaited" warning

    with pytest.raises(RuntimeError, match=r"asyncio\.run\(\) cannot be called from a running"):
        run_in_mode(mode, pre_fix_body)


@pytest.mark.parametrize("mode", IN_THIS_PROCESS)
def test_results_and_errors_pass_through(mode: str) -> None:
    assert run_in_mode(mode, lambda a, b: a + b, 2, 3) == 5

    def set_a_loop_and_fail() -> None:
        stray = asyncio.new_event_loop()
        stray.close()
        asyncio.set_event_loop(stray)
        raise ZeroDivisionError

    # The autouse fixture checks that no loop is left set even when the body raises.
    with pytest.raises(ZeroDivisionError):
        run_in_mode(mode, set_a_loop_and_fail)


@pytest.mark.parametrize("mode", IN_THIS_PROCESS)
def test_the_fixed_runner_logs_the_expected_line_in_each_mode(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def job() -> str:
        await asyncio.sleep(0)
        return "done"

    result = run_in_mode(mode, lambda: run_async_safe(job(), context={"run_id": 1}))

    assert result == "done"
    [line] = [
        match
        for record in caplog.records
        if record.name == "app.utils.asyncio_runner"
        and (match := RUNNER_RE.match(record.getMessage()))
    ]
    assert (line["detected"] == "True", line["strategy"]) == expected_runner_line(mode)
    assert all(level == "INFO" for level, _ in _idle_checks(caplog))


@pytest.mark.parametrize("mode", IN_THIS_PROCESS)
def test_modes_work_in_a_pool_thread(mode: str) -> None:
    # The threads pool runs task bodies in worker threads, not the main thread.
    seen: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            seen.append(run_in_mode(mode, _loop_state))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=10)

    assert errors == []
    [state] = seen
    assert (state["running"] is not None) == mode.startswith("running")
    assert (state["current"] is not None) == (mode != "no_loop")


def test_nothing_can_be_forced_inside_a_running_loop() -> None:
    async def main() -> None:
        with pytest.raises(LoopModeError, match="already running in this thread"):
            run_in_mode("no_loop", _loop_state)

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(main())


_SHARED_LOOP_PROGRAM = """
from gevent import monkey
monkey.patch_all()
import asyncio, logging, sys, gevent
from harness.workers.loopmodes import run_in_mode

logging.basicConfig(stream=sys.stdout, format="%(name)s %(levelname)s %(message)s", level=10)
seen = {}

def body(name):
    try:
        seen[name] = asyncio.get_running_loop() is not None
    except RuntimeError:
        seen[name] = False
    gevent.sleep(0.1)  # in flight: the other greenlet starts meanwhile
    return name

# The app under test tracks no loop per greenlet (nothing of the service is imported): the
# first run's loop is running, and visible, while the second run starts.
first = gevent.spawn(run_in_mode, "running_loop", body, "first", run_id=1)
gevent.sleep(0.02)
others = [gevent.spawn(run_in_mode, mode, body, mode, run_id=n)
          for n, mode in enumerate(["no_loop", "idle_loop", "running_loop"], start=2)]
gevent.joinall([first, *others], raise_error=True)
print("values", [g.value for g in [first, *others]])
print("seen", seen)
"""


def test_under_gevent_a_run_started_under_another_greenlets_loop_says_so() -> None:
    # Runs in flight under gevent share their OS thread's running loop unless the app tracks
    # one per greenlet: the shim cannot hide it, so it must say so (the scenarios then expect
    # the runner to detect a loop) instead of failing the run or hanging. A process of its own:
    # the patching cannot be undone.
    done = run_program(_SHARED_LOOP_PROGRAM)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert "values ['first', 'no_loop', 'idle_loop', 'running_loop']" in out, done.stdout
    seen = "seen {'first': True, 'no_loop': True, 'idle_loop': True, 'running_loop': True}"
    assert seen in out, done.stdout
    shared = [line for line in out if "shared running loop for run" in line]
    assert shared == [
        f"harness.loopmodes WARNING shared running loop for run {n}: another greenlet's loop "
        "runs on this OS thread"
        for n in (2, 3, 4)
    ], done.stdout


def test_mode_comes_from_the_message_header_as_the_worker_builds_the_request() -> None:
    # The worker builds task.request from the message headers, custom ones included
    # (celery.worker.request.Request -> celery.app.trace: Context(request_dict)).
    request = Context(
        {"id": "t-1", "task": "app.tasks.ingest.execute_ingest", LOOP_MODE_HEADER: "idle_loop"}
    )

    assert request.get(LOOP_MODE_HEADER) == "idle_loop"
    assert request.headers == {LOOP_MODE_HEADER: "idle_loop"}
    assert loop_mode_for_request(request, {DEFAULT_MODE_ENV: "running_loop"}) == (
        LoopMode.IDLE_LOOP,
        "header harness_loop_mode",
    )


def test_mode_from_request_headers_only() -> None:
    request = Context({"id": "t-1"}, headers={LOOP_MODE_HEADER: "running_uvloop"})

    assert loop_mode_for_request(request, {}) == (
        LoopMode.RUNNING_UVLOOP,
        "header harness_loop_mode",
    )


def test_mode_falls_back_to_the_environment_then_no_loop() -> None:
    request = Context({"id": "t-1", "task": "x"})

    assert loop_mode_for_request(request, {DEFAULT_MODE_ENV: "running_loop"}) == (
        LoopMode.RUNNING_LOOP,
        DEFAULT_MODE_ENV,
    )
    assert loop_mode_for_request(request, {DEFAULT_MODE_ENV: " "}) == (LoopMode.NO_LOOP, "default")
    assert loop_mode_for_request(None, {}) == (LoopMode.NO_LOOP, "default")


def test_a_bad_header_is_an_error_not_a_silent_default() -> None:
    request = Context({"id": "t-1", LOOP_MODE_HEADER: "running"})

    with pytest.raises(LoopModeError, match="unknown loop mode 'running'"):
        loop_mode_for_request(request, {})


@pytest.mark.asyncio
async def test_in_process_cell_runs_under_the_test_s_own_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The matrix's in_process cell: an async test calls sync code that calls the runner.
    caplog.set_level(logging.INFO, "app.utils.asyncio_runner")

    async def job() -> int:
        return 7

    assert run_async_safe(job(), context={"run_id": 5}) == 7
    [message] = [record.getMessage() for record in caplog.records]
    match = RUNNER_RE.match(message)
    assert match is not None
    assert (match["detected"] == "True", match["strategy"]) == expected_runner_line(IN_PROCESS)


_FORK_PROGRAM = """
import asyncio, os, sys, logging
from harness.workers.loopmodes import make_parent_loop, run_in_mode
from app.utils.asyncio_runner import run_async_safe

logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s", level=20)
make_parent_loop()  # the worker's parent, before its pool forks
parent_loop = asyncio.get_event_loop()
pid = os.fork()
if pid == 0:
    try:
        asyncio.set_event_loop(None)  # an earlier run in this child unset it
        got = run_in_mode("inherited_loop", run_async_safe, asyncio.sleep(0, "ran"), run_id=5)
        print("child", got, asyncio.get_event_loop_policy().get_event_loop() is None)
    finally:
        sys.stdout.flush()
        os._exit(0)
os.waitpid(pid, 0)
try:
    run_in_mode("inherited_loop", lambda: None)
except Exception as exc:
    print("parent", type(exc).__name__)
parent_loop.close()
"""


def test_inherited_loop_is_the_parents_loop_in_a_forked_child() -> None:
    # In a process of its own: it forks.
    done = run_program(_FORK_PROGRAM)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert "INFO inherited loop check for run 5: still set and open" in out, done.stdout
    assert "parent LoopModeError" in out, done.stdout  # the parent itself is no forked child


def test_inherited_loop_cannot_be_forced_outside_a_forked_worker_child() -> None:
    with pytest.raises(LoopModeError, match="exists on the prefork pool only"):
        run_in_mode("inherited_loop", lambda: None)
