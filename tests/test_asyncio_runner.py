"""Unit tests for ``app.utils.asyncio_runner.run_async_safe``.

Each property from the issue is a ``check_*`` function taking the runner under test, so the same
check runs against ``run_async_safe`` (must pass) and, in ``test_naive_runner_fails_properties``,
against two naive implementations (must fail): plain ``asyncio.run()``, and ``asyncio.run()`` in a
shared single-worker executor without a context copy.

"Thread path" means: called from sync code while a loop is running in the calling thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import re
import signal
import threading
import time
import types
import warnings
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import pytest
import uvloop
from celery.exceptions import SoftTimeLimitExceeded

from app.utils import asyncio_runner
from app.utils.asyncio_runner import run_async_safe
from tests._children import run_program

R = TypeVar("R")

LOGGER = "app.utils.asyncio_runner"
JOB_CONTEXT: dict[str, object] = {"run_id": 123, "job_code": "frontend_prices"}
NO_LOOP_LINE = (
    "run_async_safe: detected_running_loop=False, using asyncio.run() "
    "(context: {'run_id': 123, 'job_code': 'frontend_prices'})"
)
THREAD_LINE = (
    "run_async_safe: detected_running_loop=True, using thread pool "
    "(context: {'run_id': 123, 'job_code': 'frontend_prices'})"
)
HELPER_NAME = re.compile(r"^run_async_safe-\d+$")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


class Runner(Protocol):
    def __call__(
        self, coro: Coroutine[Any, Any, R], *, context: Mapping[str, object] | None = None
    ) -> R: ...


class JobFailedError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# helpers


def _run_under_loop(fn: Callable[[], R]) -> R:
    """Call sync ``fn`` while a loop is running in this thread (i.e. on the thread path)."""

    async def main() -> R:
        return fn()

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(main())


def _run_with_deadline(fn: Callable[[], R], deadline: float) -> R:
    """Run ``fn`` in a daemon thread so that a deadlock fails the test instead of hanging it."""
    outcome: list[R] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="deadline-guard", daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        pytest.fail(f"still blocked after {deadline}s: deadlock")
    if errors:
        raise errors[0]
    return outcome[0]


def _thread_loop() -> asyncio.AbstractEventLoop | None:
    """The loop set for this thread (not running), or None if it was cleared."""
    try:
        return asyncio.get_event_loop()
    except RuntimeError:
        return None


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@contextlib.contextmanager
def _signal_raises_when(
    ready: threading.Event,
    make_exc: Callable[[], BaseException],
    raised: list[BaseException],
    *,
    only_in: str | None = None,
) -> Iterator[None]:
    """Have a SIGALRM handler raise ``make_exc()`` in the main thread once ``ready`` is set.

    The timer re-arms itself until then, so the exception always lands while the coroutine is
    in flight, however slowly the helper thread starts. ``only_in`` further waits until the
    main thread is inside a function of that name (e.g. the selector's ``select``).
    """

    def handler(signum: int, frame: types.FrameType | None) -> None:
        in_place = only_in is None or (frame is not None and frame.f_code.co_name == only_in)
        if not (ready.is_set() and in_place):
            signal.setitimer(signal.ITIMER_REAL, 0.02)
            return
        exc = make_exc()
        raised.append(exc)
        raise exc

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.02)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


async def _answer() -> int:
    await asyncio.sleep(0)
    return 42


# --------------------------------------------------------------------------------------------
# property checks, shared by the real tests and the naive-implementation proof


def check_exception_propagates(runner: Runner) -> None:
    raised: list[JobFailedError] = []

    async def fail() -> None:
        await asyncio.sleep(0)
        exc = JobFailedError("price feed returned 502")
        raised.append(exc)
        raise exc

    with pytest.raises(JobFailedError, match=r"^price feed returned 502$") as excinfo:
        runner(fail())
    assert excinfo.value is raised[0]


def check_base_exception_propagates(runner: Runner, exc_type: type[BaseException]) -> None:
    raised: list[BaseException] = []

    async def fail() -> None:
        await asyncio.sleep(0)
        exc = exc_type("from inside the coroutine")
        raised.append(exc)
        raise exc

    with pytest.raises(exc_type) as excinfo:
        runner(fail())
    assert excinfo.value is raised[0]


def check_contextvars_visible(runner: Runner) -> None:
    token = request_id.set("req-42")
    try:

        async def read_and_modify() -> str:
            await asyncio.sleep(0)
            seen = request_id.get()
            request_id.set("set-inside")
            return seen

        assert runner(read_and_modify()) == "req-42"
        # Like asyncio.run() and tasks: the coroutine works on a copy, on both paths.
        assert request_id.get() == "req-42"
    finally:
        request_id.reset(token)


def check_set_loop_preserved(runner: Runner) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # what a library calling get_event_loop() leaves behind
    try:

        async def which_loop() -> asyncio.AbstractEventLoop:
            await asyncio.sleep(0)
            return asyncio.get_running_loop()

        assert runner(which_loop()) is not loop
        assert _thread_loop() is loop
        assert not loop.is_closed()
        assert loop.run_until_complete(asyncio.sleep(0, "still usable")) == "still usable"
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def check_nested_calls(runner: Runner, depth: int = 3, deadline: float = 30.0) -> None:
    def sync_library_call(level: int) -> list[str]:
        return runner(run_level(level))

    async def run_level(level: int) -> list[str]:
        await asyncio.sleep(0)
        here = threading.current_thread().name
        if level == 0:
            return [here]
        return [here, *sync_library_call(level - 1)]

    async def driver() -> list[str]:
        return sync_library_call(depth)

    names = _run_with_deadline(lambda: asyncio.run(driver()), deadline)
    assert len(names) == depth + 1
    assert len(set(names)) == depth + 1, names


def check_parallel_callers(
    runner: Runner, *, under_loop: bool, callers: int = 4, timeout: float = 20.0
) -> None:
    # Every coroutine blocks until all of them are in flight, so this only completes if the
    # calls really overlap; a serialising runner breaks the barrier after `timeout`.
    barrier = threading.Barrier(callers, timeout=timeout)

    async def job(i: int) -> int:
        await asyncio.sleep(0)
        barrier.wait()
        return i

    def celery_thread(i: int) -> int:
        if under_loop:
            return _run_under_loop(lambda: runner(job(i)))
        return runner(job(i))

    with ThreadPoolExecutor(max_workers=callers, thread_name_prefix="celery-thread") as pool:
        assert list(pool.map(celery_thread, range(callers))) == list(range(callers))


def check_no_thread_leak(runner: Runner, calls: int = 300) -> None:
    async def job(i: int) -> int:
        if i % 10 == 0:
            # Spins up the helper loop's default executor, which must be shut down too.
            return await asyncio.to_thread(lambda: i)
        await asyncio.sleep(0)
        return i

    before = threading.active_count()
    peak = before

    def counted(i: int) -> int:
        nonlocal peak
        result = runner(job(i))
        peak = max(peak, threading.active_count())
        return result

    assert [counted(i) for i in range(calls)] == list(range(calls))
    # Calls one after another reuse a helper instead of piling threads up...
    assert peak <= before + 2, f"{peak - before} extra threads during {calls} sequential calls"
    # ...and once idle it exits: after the calls, no more threads than before.
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


def check_rejects_non_coroutines(runner: Runner) -> None:
    calls: list[str] = []

    async def fetch_prices() -> None:
        calls.append("ran")

    def sync_prices() -> int:
        calls.append("ran")
        return 1

    def not_async() -> Iterator[int]:
        calls.append("ran")
        yield 1

    generator = not_async()
    for bad in (fetch_prices, sync_prices, generator, 42, None):
        with pytest.raises(TypeError) as excinfo:
            runner(bad)  # type: ignore[arg-type]
        message = str(excinfo.value)
        assert type(bad).__name__ in message, message
        assert repr(bad) in message, message
        assert "coro(), not coro" in message or "not fetch_prices" in message, message

    with pytest.raises(TypeError, match=r"pass fetch_prices\(\), not fetch_prices"):
        runner(fetch_prices)  # type: ignore[arg-type]
    assert calls == []


# --------------------------------------------------------------------------------------------
# logging


@pytest.mark.parametrize(
    ("context", "rendered"),
    [(JOB_CONTEXT, repr(JOB_CONTEXT)), (None, "None")],
    ids=["job-context", "no-context"],
)
def test_logs_no_loop_path(
    caplog: pytest.LogCaptureFixture, context: dict[str, object] | None, rendered: str
) -> None:
    """Naive asyncio.run() logs nothing."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert run_async_safe(_answer(), context=context) == 42
    assert _messages(caplog) == [
        f"run_async_safe: detected_running_loop=False, using asyncio.run() (context: {rendered})"
    ]
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.INFO]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("context", "rendered"),
    [(JOB_CONTEXT, repr(JOB_CONTEXT)), (None, "None")],
    ids=["job-context", "no-context"],
)
async def test_logs_thread_path(
    caplog: pytest.LogCaptureFixture, context: dict[str, object] | None, rendered: str
) -> None:
    """Naive asyncio.run() raises RuntimeError here and logs nothing."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert run_async_safe(_answer(), context=context) == 42
    assert _messages(caplog) == [
        f"run_async_safe: detected_running_loop=True, using thread pool (context: {rendered})"
    ]
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.INFO]


def test_exact_log_line_for_the_issue_example(caplog: pytest.LogCaptureFixture) -> None:
    """The two lines quoted in the issue, verbatim (naive asyncio.run() logs nothing)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    run_async_safe(_answer(), context={"run_id": 123, "job_code": "frontend_prices"})
    _run_under_loop(
        lambda: run_async_safe(_answer(), context={"run_id": 123, "job_code": "frontend_prices"})
    )
    assert _messages(caplog) == [NO_LOOP_LINE, THREAD_LINE]


# --------------------------------------------------------------------------------------------
# 1. exceptions


def test_exception_propagates_without_loop() -> None:
    """Naive asyncio.run() passes here; it fails the running-loop variant below."""
    check_exception_propagates(run_async_safe)


@pytest.mark.asyncio
async def test_exception_propagates_from_running_loop() -> None:
    """Naive asyncio.run() raises RuntimeError ("cannot be called from a running event loop")
    instead of the job's exception."""
    check_exception_propagates(run_async_safe)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_propagates_without_loop(exc_type: type[BaseException]) -> None:
    """Naive asyncio.run() passes this half; the running-loop twin below is the one it fails."""
    check_base_exception_propagates(run_async_safe, exc_type)


@pytest.mark.asyncio
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_base_exception_propagates_from_running_loop(
    exc_type: type[BaseException],
) -> None:
    """A runner that only forwards ``Exception`` would kill the helper thread instead (and
    naive asyncio.run() raises RuntimeError here)."""
    check_base_exception_propagates(run_async_safe, exc_type)


# --------------------------------------------------------------------------------------------
# 2. contextvars


def test_contextvars_visible_without_loop() -> None:
    """Naive asyncio.run() passes this half (it copies the context); the running-loop twin
    below is the one both naive versions fail."""
    check_contextvars_visible(run_async_safe)


@pytest.mark.asyncio
async def test_contextvars_visible_from_running_loop() -> None:
    """Naive asyncio.run() raises RuntimeError; an executor without a context copy runs the
    coroutine in the worker thread's empty context, so ``request_id.get()`` raises LookupError."""
    check_contextvars_visible(run_async_safe)


@pytest.mark.asyncio
async def test_contextvars_visible_through_nested_calls() -> None:
    """Naive asyncio.run() raises RuntimeError; an executor without a context copy raises
    LookupError (and deadlocks on the nested call if it has one worker)."""
    token = request_id.set("outer-request")
    try:

        async def inner() -> str:
            return request_id.get()

        async def outer() -> str:
            return run_async_safe(inner())  # sync call from inside a helper thread's loop

        assert run_async_safe(outer()) == "outer-request"
    finally:
        request_id.reset(token)


# --------------------------------------------------------------------------------------------
# 3. a loop set for the thread (not running) is left alone


def test_set_loop_preserved_in_main_thread() -> None:
    """Naive asyncio.run() calls set_event_loop(None) on exit, so afterwards the thread has no
    current loop and get_event_loop() raises."""
    check_set_loop_preserved(run_async_safe)


def test_set_loop_preserved_in_worker_thread() -> None:
    """Same as above in a Celery-style worker thread (naive asyncio.run() fails the same way)."""
    _run_with_deadline(lambda: check_set_loop_preserved(run_async_safe), deadline=30)


# --------------------------------------------------------------------------------------------
# 4. re-entrancy


def test_nested_calls_do_not_deadlock() -> None:
    """Naive asyncio.run() raises RuntimeError at the first nested call; a shared
    max_workers=1 executor deadlocks (the inner call waits for the worker it is running on)."""
    check_nested_calls(run_async_safe)


# --------------------------------------------------------------------------------------------
# 5. parallelism


def test_parallel_callers_without_loop() -> None:
    """Celery threads pool, plain sync tasks: each thread runs its own loop concurrently."""
    check_parallel_callers(run_async_safe, under_loop=False)


def test_parallel_callers_with_running_loops() -> None:
    """Naive asyncio.run() raises RuntimeError; a shared single-worker executor (or a global
    lock) runs the coroutines one after another, so the barrier breaks."""
    check_parallel_callers(run_async_safe, under_loop=True)


# --------------------------------------------------------------------------------------------
# 6. no leaks


@pytest.mark.asyncio
async def test_no_thread_leak_after_300_thread_path_calls() -> None:
    """Naive asyncio.run() raises RuntimeError; an executor keeps its worker thread alive."""
    check_no_thread_leak(run_async_safe)


# --------------------------------------------------------------------------------------------
# 7. argument checking


def test_rejects_non_coroutines_without_loop(caplog: pytest.LogCaptureFixture) -> None:
    """Naive asyncio.run() raises ValueError ("a coroutine was expected"), not TypeError."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    check_rejects_non_coroutines(run_async_safe)
    assert _messages(caplog) == []


@pytest.mark.asyncio
async def test_rejects_non_coroutines_from_running_loop(caplog: pytest.LogCaptureFixture) -> None:
    """Naive asyncio.run() raises RuntimeError here, not TypeError."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    check_rejects_non_coroutines(run_async_safe)
    assert _messages(caplog) == []


# --------------------------------------------------------------------------------------------
# the helper thread


@pytest.mark.asyncio
async def test_thread_path_uses_named_daemon_thread_and_its_own_loop() -> None:
    """Naive asyncio.run() raises RuntimeError; executor threads are neither named like this
    nor daemon threads, and never exit while the executor lives."""
    caller_loop = asyncio.get_running_loop()

    async def where() -> tuple[threading.Thread, asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return threading.current_thread(), asyncio.get_running_loop()

    first, first_loop = run_async_safe(where())
    second, second_loop = run_async_safe(where())
    for helper in (first, second):
        assert HELPER_NAME.match(helper.name), helper.name
        assert helper.daemon
        assert helper is not threading.main_thread()
    # A helper may be reused for the next call, but never its loop: every call gets a fresh one.
    assert first_loop is not second_loop
    assert first_loop is not caller_loop
    assert first_loop.is_closed() and second_loop.is_closed()
    # An idle helper does not outlive its idle timeout.
    for helper in (first, second):
        helper.join(timeout=5)
        assert not helper.is_alive()


def test_no_loop_path_runs_in_the_calling_thread() -> None:
    """Design check rather than a naive-version failure (asyncio.run() also runs in place)."""

    async def where() -> threading.Thread:
        return threading.current_thread()

    assert run_async_safe(where()) is threading.current_thread()


# --------------------------------------------------------------------------------------------
# interruption by signals (Celery soft time limit, Ctrl-C)


@pytest.mark.asyncio
@pytest.mark.parametrize("exc_type", [SoftTimeLimitExceeded, KeyboardInterrupt])
async def test_interrupted_caller_cancels_coroutine_on_thread_path(
    exc_type: type[BaseException],
) -> None:
    """Naive asyncio.run() raises RuntimeError before anything runs; an executor's
    ``future.result()`` leaves the coroutine running in its worker after the caller gave up."""
    started = threading.Event()
    saw_cancel = threading.Event()
    helpers: list[threading.Thread] = []
    raised: list[BaseException] = []

    async def long_job() -> None:
        helpers.append(threading.current_thread())
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    with (
        _signal_raises_when(started, lambda: exc_type("interrupted"), raised),
        pytest.raises(exc_type) as excinfo,
    ):
        run_async_safe(long_job())

    assert excinfo.value is raised[0]
    assert saw_cancel.is_set()
    # The helper is free again (not stuck in the coroutine): idle, it exits on its timeout.
    helpers[0].join(timeout=5)
    assert not helpers[0].is_alive()


@pytest.mark.asyncio
async def test_interrupted_caller_waits_only_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A coroutine that will not unwind must not hold the caller past the grace period.

    Naive asyncio.run() raises RuntimeError; an unbounded ``join()`` after cancelling would
    block here until ``release`` is set."""
    monkeypatch.setattr(asyncio_runner, "_CANCEL_GRACE_SECONDS", 0.2)
    started = threading.Event()
    saw_cancel = threading.Event()
    release = threading.Event()
    helpers: list[threading.Thread] = []
    raised: list[BaseException] = []

    async def stubborn_job() -> None:
        helpers.append(threading.current_thread())
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            saw_cancel.set()
            release.wait(60)  # stuck in blocking code while being cancelled
            raise

    try:
        with (
            _signal_raises_when(started, lambda: SoftTimeLimitExceeded("soft"), raised),
            pytest.raises(SoftTimeLimitExceeded) as excinfo,
        ):
            run_async_safe(stubborn_job())
        assert excinfo.value is raised[0]
        assert saw_cancel.wait(30)
        assert helpers[0].is_alive()  # we returned without waiting for it
    finally:
        release.set()
        helpers[0].join(30)
    assert not helpers[0].is_alive()


def test_interrupted_run_cancels_coroutine_on_no_loop_path() -> None:
    """Here the coroutine runs in the main thread, so the exception is only raised once the
    loop is idle in select(): raised inside the coroutine's own frame it would simply be the
    coroutine's exception, and raised inside a loop callback asyncio would log and drop it.

    Naive asyncio.run() behaves the same here (same Runner clean-up); this pins the behaviour."""
    started = threading.Event()
    saw_cancel = threading.Event()
    raised: list[BaseException] = []

    async def long_job() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    with (
        _signal_raises_when(
            started, lambda: SoftTimeLimitExceeded("soft"), raised, only_in="select"
        ),
        pytest.raises(SoftTimeLimitExceeded) as excinfo,
    ):
        run_async_safe(long_job())
    assert excinfo.value is raised[0]
    assert saw_cancel.is_set()


# --------------------------------------------------------------------------------------------
# uvloop


def test_thread_path_under_uvloop(caplog: pytest.LogCaptureFixture) -> None:
    """Naive asyncio.run() raises RuntimeError under a running uvloop loop too."""
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        assert run_async_safe(_answer(), context=JOB_CONTEXT) == 42
        check_exception_propagates(run_async_safe)
        check_contextvars_visible(run_async_safe)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    assert _messages(caplog)[0] == THREAD_LINE
    assert all("detected_running_loop=True" in m for m in _messages(caplog))


def test_interrupted_caller_under_uvloop() -> None:
    """As the thread-path interruption test, with uvloop as the caller's loop (uvloop sets a
    signal wakeup fd in the main thread, which must not stop the handler from raising)."""
    started = threading.Event()
    saw_cancel = threading.Event()
    raised: list[BaseException] = []

    async def long_job() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    async def main() -> None:
        with (
            _signal_raises_when(started, lambda: SoftTimeLimitExceeded("soft"), raised),
            pytest.raises(SoftTimeLimitExceeded) as excinfo,
        ):
            run_async_safe(long_job())
        assert excinfo.value is raised[0]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    assert saw_cancel.is_set()


# --------------------------------------------------------------------------------------------
# proof that the checks above catch the naive implementations


def naive_asyncio_run(
    coro: Coroutine[Any, Any, R], *, context: Mapping[str, object] | None = None
) -> R:
    """The pre-fix code: plain asyncio.run()."""
    return asyncio.run(coro)


class NaiveExecutorRunner:
    """asyncio.run() without a loop; otherwise asyncio.run() on a shared one-worker executor,
    without copying the caller's context.

    ``wait_timeout`` is only a safety valve so that demonstrating the deadlock cannot hang the
    test session.
    """

    def __init__(self, wait_timeout: float) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="naive")
        self.wait_timeout = wait_timeout

    def __call__(
        self, coro: Coroutine[Any, Any, R], *, context: Mapping[str, object] | None = None
    ) -> R:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        return self.pool.submit(asyncio.run, coro).result(timeout=self.wait_timeout)


RUNNING_LOOP_ERROR = "cannot be called from a running event loop"

NAIVE_CASES = [
    # (property, naive runner, run the check under a running loop?, expected failure, match)
    ("1-exceptions", "asyncio.run", True, RuntimeError, RUNNING_LOOP_ERROR),
    ("2-contextvars", "asyncio.run", True, RuntimeError, RUNNING_LOOP_ERROR),
    ("2-contextvars", "executor", True, LookupError, "request_id"),
    ("3-set-loop", "asyncio.run", False, AssertionError, ""),
    ("3-set-loop", "executor", False, AssertionError, ""),
    ("4-nested", "asyncio.run", False, RuntimeError, RUNNING_LOOP_ERROR),
    ("4-nested", "executor", False, TimeoutError, ""),
    ("5-parallel", "asyncio.run", False, RuntimeError, RUNNING_LOOP_ERROR),
    ("5-parallel", "executor", False, threading.BrokenBarrierError, ""),
    ("6-leak", "asyncio.run", True, RuntimeError, RUNNING_LOOP_ERROR),
    ("6-leak", "executor", True, AssertionError, ""),
    ("7-type-error", "asyncio.run", False, ValueError, "a coroutine was expected"),
    ("7-type-error", "executor", False, ValueError, "a coroutine was expected"),
]

PROPERTY_CHECKS: dict[str, Callable[[Runner], None]] = {
    "1-exceptions": check_exception_propagates,
    "2-contextvars": check_contextvars_visible,
    "3-set-loop": check_set_loop_preserved,
    "4-nested": lambda runner: check_nested_calls(runner, deadline=30),
    "5-parallel": lambda runner: check_parallel_callers(runner, under_loop=True, timeout=0.5),
    "6-leak": check_no_thread_leak,
    "7-type-error": check_rejects_non_coroutines,
}


@pytest.mark.parametrize(
    ("prop", "naive", "under_loop", "expected", "match"),
    NAIVE_CASES,
    ids=[f"{case[0]}-{case[1]}" for case in NAIVE_CASES],
)
def test_naive_runner_fails_properties(
    prop: str, naive: str, under_loop: bool, expected: type[BaseException], match: str
) -> None:
    """Each property check fails against a naive runner, and for the stated reason."""
    check = PROPERTY_CHECKS[prop]
    executor_runner = NaiveExecutorRunner(wait_timeout=2.0 if prop == "5-parallel" else 0.5)
    runner: Runner = naive_asyncio_run if naive == "asyncio.run" else executor_runner
    failure: tuple[type[BaseException], str] | None = None
    # The naive runners leave never-awaited coroutines behind; that warning is not what this
    # test is about, so collect them here rather than have them fire in some later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            if under_loop:
                _run_under_loop(lambda: check(runner))
            else:
                check(runner)
        except (Exception, pytest.fail.Exception) as exc:
            failure = (type(exc), str(exc))
        finally:
            executor_runner.pool.shutdown(wait=True)
            gc.collect()

    assert failure is not None, f"naive {naive} unexpectedly satisfies property {prop}"
    assert issubclass(failure[0], expected), failure
    assert re.search(match, failure[1]), failure


# 5-parallel is left out: with the real runner its 0.5s barrier timeout could flake under load;
# test_parallel_callers_with_running_loops is its control, with a generous timeout.
@pytest.mark.parametrize("prop", sorted(set(PROPERTY_CHECKS) - {"5-parallel"}))
def test_same_checks_pass_for_run_async_safe(prop: str) -> None:
    """Control for the test above: the identical invocation succeeds with the real runner."""
    under_loop = any(case[0] == prop and case[2] for case in NAIVE_CASES)
    if under_loop:
        _run_under_loop(lambda: PROPERTY_CHECKS[prop](run_async_safe))
    else:
        PROPERTY_CHECKS[prop](run_async_safe)


_GEVENT_PROGRAM = """
from gevent import monkey
monkey.patch_all()
import asyncio, os, time, gevent
from app.utils.asyncio_runner import run_async_safe

N = 8
seen = {}

async def ticks(n):
    for i in range(3):
        # The loop waits, gevent switches to the other greenlets, and their loops end at other
        # times than this one: a generator registered with another's loop would be closed by
        # that loop's shutdown while this one still iterates it.
        await asyncio.sleep(0.02 * (n % 3 + 1))
        yield i

async def job(n, caller_loop):
    try:
        import _no_such_module_  # what httpcore does on every call without sniffio
    except ImportError:
        pass
    loop = asyncio.get_running_loop()
    assert loop is not caller_loop, n
    got = [i async for i in ticks(n)]  # an async generator, as httpx streams a body
    assert asyncio.get_running_loop() is loop, n
    seen[n] = len(os.listdir("/proc/self/task"))
    return n, got

async def under_a_running_loop(n):
    return run_async_safe(job(n, asyncio.get_running_loop()))

def call(n):
    if n % 2:
        return asyncio.run(under_a_running_loop(n))
    return run_async_safe(job(n, None))

start = time.monotonic()
greenlets = [gevent.spawn(call, n) for n in range(N)]
gevent.joinall(greenlets, timeout=30, raise_error=True)
took = time.monotonic() - start
assert [g.value for g in greenlets] == [(n, [0, 1, 2]) for n in range(N)], greenlets
assert took < N * 0.15, f"the calls waited for each other: {took:.2f} s"
assert set(seen.values()) == {1}, f"OS threads during the calls: {seen}"
print("ok")
"""


def test_under_gevent_calls_in_flight_at_once_each_run_on_their_own_loop() -> None:
    # Under gevent's monkey-patching every task is a greenlet on one OS thread, where asyncio
    # keeps one running loop and one set of async generator hooks: without the runner's
    # per-greenlet tracking a task sees another's loop, the helper's loop cannot start, or a
    # loop's shutdown closes another task's generator. Several calls at once, half of them
    # from a running loop, must each get a loop of their own, overlap, and start no OS thread
    # (a real OS thread shares gevent's patched import and logging locks, whose wake-ups gevent
    # loses across threads). In a process of its own: the patching cannot be undone.
    done = run_program(_GEVENT_PROGRAM)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "ok", ""), done.stderr[-3000:]
