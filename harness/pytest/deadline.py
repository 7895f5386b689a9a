"""A deadline for every test: a hang fails the test within a second of it, with every thread's
stack, instead of holding the session until an outer limit kills it.

A watchdog thread waits for the running test's deadline. When it passes, it takes the stack of
every thread of the test process (the hang and what it waits for) and of every Celery worker
the process runs (:mod:`harness.core.stacks`: each worker dumps its own on SIGUSR2, in C, so a
worker stuck in a blocking call still answers), then sends ``SIGUSR1`` to
the main thread, whose handler raises :class:`DeadlineExceeded` with those stacks where the
test stands. A real signal, not a simulated one: it interrupts a blocking lock acquire, a sleep
or a socket read, which a runner that makes a nested call wait for its own caller is stuck in.

The deadline is ``--harness-deadline SECONDS`` (ini ``harness_deadline``, environment
``HARNESS_DEADLINE_S``; 300 s by default, 0 turns it off) and per test
``@pytest.mark.deadline(seconds)``. It covers the test's setup, call and teardown, each from its
start. Where no signal can reach the main thread (not the main thread, not POSIX), it is off.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Generator
from types import FrameType
from typing import Final

import pytest

from harness.core import stacks
from harness.core.errors import CheckFailed

__all__ = [
    "DEADLINE_ENV",
    "DEFAULT_DEADLINE_S",
    "DeadlineExceeded",
    "DeadlinePlugin",
    "hang_report",
]

DEADLINE_ENV: Final = "HARNESS_DEADLINE_S"
DEFAULT_DEADLINE_S: Final = 300.0
_SIGNAL: Final = getattr(signal, "SIGUSR1", None)


class DeadlineExceeded(CheckFailed):
    """The test was still running at its deadline; the message holds every thread's stack."""


def thread_stacks(skip: int | None = None) -> str:
    """Every thread's stack, innermost call last, headed by its name and ident."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    blocks = []
    for ident, frame in sys._current_frames().items():
        if ident == skip:
            continue
        stack = "".join(traceback.format_stack(frame))
        blocks.append(f"--- thread {names.get(ident, '?')} ({ident}):\n{stack}")
    return "\n".join(blocks)


def hang_report(what: str, seconds: float, *, skip: int | None = None) -> str:
    """What a test that passed its deadline fails with: every thread's stack of the test
    process, then of each process it drives that can dump its own (its Celery workers)."""
    text = (
        f"{what} passed its {seconds:g} s deadline (--harness-deadline or "
        "@pytest.mark.deadline): it hung, or waited far longer than it should. "
        "Stacks of every thread of the test process when the deadline passed:\n"
        + thread_stacks(skip=skip)
    )
    others = stacks.collect()
    if others:
        text += "\n\nStacks of the Celery workers the test process runs:\n" + others
    return text


def parse_deadline(value: str, source: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise pytest.UsageError(
            f"{source}: {value!r} is not a number of seconds >= 0 (0 turns the deadline off)"
        )
    return seconds


def add_options(parser: pytest.Parser) -> None:
    help_text = (
        "fail a test that runs longer than this many seconds, with every thread's stack "
        f"(0: off; default {DEFAULT_DEADLINE_S:g}, or ${DEADLINE_ENV})"
    )
    parser.getgroup("ingest-harness").addoption(
        "--harness-deadline", dest="harness_deadline", default=None, help=help_text
    )
    parser.addini("harness_deadline", help_text, default=None)


def configured_deadline(config: pytest.Config) -> float:
    """The session's deadline, from the option, the environment, the ini, in that order."""
    option = config.getoption("harness_deadline")
    if option is not None:
        return parse_deadline(str(option), "--harness-deadline")
    env = os.environ.get(DEADLINE_ENV, "").strip()
    if env:
        return parse_deadline(env, DEADLINE_ENV)
    ini = config.getini("harness_deadline")
    if ini:
        return parse_deadline(str(ini), "harness_deadline (ini)")
    return DEFAULT_DEADLINE_S


class DeadlinePlugin:
    """Arms the watchdog around each phase of each test (registered by the harness plugin)."""

    def __init__(self, default_s: float) -> None:
        self.default_s = default_s
        self._main = threading.main_thread().ident
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._armed: tuple[float, float, str] | None = None  # (due, seconds, what)
        self._fired: str | None = None
        self._previous: object = None
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="harness-deadline", daemon=True)

    @staticmethod
    def usable() -> bool:
        return _SIGNAL is not None and threading.current_thread() is threading.main_thread()

    def start(self) -> None:
        assert _SIGNAL is not None
        self._previous = signal.signal(_SIGNAL, self._on_signal)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._armed = None
            self._wake.notify()
        self._thread.join(timeout=5)
        if _SIGNAL is not None:
            signal.signal(_SIGNAL, self._previous)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        message, self._fired = self._fired, None
        if message is not None:
            raise DeadlineExceeded(message)

    def _watch(self) -> None:
        with self._lock:
            while not self._stopped:
                if self._armed is None:
                    self._wake.wait()
                    continue
                due, seconds, what = self._armed
                left = due - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                self._armed = None
                self._fired = hang_report(what, seconds, skip=threading.get_ident())
                assert _SIGNAL is not None and self._main is not None
                signal.pthread_kill(self._main, _SIGNAL)

    def _seconds(self, item: pytest.Item) -> float:
        marker = item.get_closest_marker("deadline")
        if marker is None:
            return self.default_s
        if len(marker.args) != 1 or isinstance(marker.args[0], bool):
            raise pytest.UsageError(f"{item.nodeid}: use @pytest.mark.deadline(seconds)")
        return parse_deadline(str(marker.args[0]), f"{item.nodeid}: @pytest.mark.deadline")

    def _phase(self, item: pytest.Item, when: str) -> Generator[None, None, None]:
        seconds = self._seconds(item)
        if seconds > 0:
            with self._lock:
                self._armed = (time.monotonic() + seconds, seconds, f"{item.nodeid} ({when})")
                self._wake.notify()
        try:
            yield
        finally:
            with self._lock:
                self._armed = None
                self._fired = None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        return (yield from self._phase(item, "setup"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        return (yield from self._phase(item, "call"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        return (yield from self._phase(item, "teardown"))
