"""Run a coroutine to completion from synchronous code, whether or not this thread has a loop.

Celery tasks are synchronous but call async job code, and the same task code also runs under
callers that already have a running event loop (pytest-asyncio, uvicorn, nested helpers), where a
plain ``asyncio.run()`` raises; this module picks a safe strategy for each case.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import logging
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Generic, TypeVar, cast

__all__ = ["run_async_safe"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

# The waiting caller wakes up this often so that exceptions raised by signal handlers (Celery's
# SoftTimeLimitExceeded, KeyboardInterrupt) surface promptly on every platform.
_POLL_SECONDS = 0.05
# After cancelling the coroutine we give it this long to unwind; a coroutine that swallows
# cancellation must not be able to hold the caller (and its time limit) hostage.
_CANCEL_GRACE_SECONDS = 5.0

# A helper thread that has had no work for this long exits: reuse makes back-to-back calls
# cheap (a thread start costs more than the loop itself on small VMs) and idle threads never pile
# up in a long-lived worker.
_IDLE_SECONDS = 0.2

_thread_numbers = itertools.count(1)


def _gevent_patched() -> Any:
    """gevent's ``monkey`` module if it has patched ``threading`` in this process, else None."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return monkey
    return None


def _running_loop_per_greenlet() -> None:
    """Make asyncio's running loop follow the greenlet, not the OS thread, in this thread.

    Under gevent's patching (Celery's ``-P gevent``) tasks are greenlets on one OS thread, a
    ``threading.Thread`` is a greenlet too, and asyncio keeps the running loop per OS thread.
    A loop that waits for I/O switches to the hub, so every other greenlet then sees it as its
    own running loop: a task that has no loop takes the thread path, and the helper's fresh
    loop refuses to start ("Cannot run the event loop while another loop is running").

    A greenlet trace function, chained to any that was set before, saves the running loop (and
    the loop's async generator hooks, also kept per OS thread) of the greenlet switched away
    from and restores those of the greenlet switched to. Each greenlet then has the running loop
    asyncio would give a thread, and the helper "thread" can stay a greenlet. A real OS thread
    instead would share the patched locks (the import system's module locks, logging's) with the
    greenlets, and gevent loses wake-ups on locks waited for across OS threads: with several
    runs in flight some hung for good.
    """
    import greenlet

    previous = greenlet.gettrace()
    if getattr(previous, "_run_async_safe", False):
        return
    # Not asyncio.get_running_loop(): the tracer runs on every switch and must not raise.
    get_loop = asyncio.events._get_running_loop
    set_loop = asyncio.events._set_running_loop
    # What a running loop keeps per thread: itself and its async generator hooks (a generator
    # first iterated under another greenlet's hooks would be closed by that loop's shutdown).
    states: weakref.WeakKeyDictionary[Any, tuple[Any, Any, Any]] = weakref.WeakKeyDictionary()
    none: tuple[Any, Any, Any] = (None, None, None)

    def trace(event: str, args: tuple[Any, Any]) -> None:
        if event in ("switch", "throw"):
            origin, target = args
            hooks = sys.get_asyncgen_hooks()
            state = (get_loop(), hooks.firstiter, hooks.finalizer)
            if state == none:
                states.pop(origin, None)
            else:
                states[origin] = state
            loop, firstiter, finalizer = states.get(target, none)
            set_loop(loop)
            sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=finalizer)
        if previous is not None:
            previous(event, args)

    trace._run_async_safe = True  # type: ignore[attr-defined]
    greenlet.settrace(trace)


class _Helper(threading.Thread):
    """A daemon thread that runs one call at a time and parks itself between calls."""

    def __init__(self, pool: _HelperThreads) -> None:
        # Daemon: a wedged coroutine must never keep the worker process from exiting.
        super().__init__(name=f"run_async_safe-{next(_thread_numbers)}", daemon=True)
        self.jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._pool = pool

    def run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=_IDLE_SECONDS)
            except queue.Empty:
                if self._pool.retire(self):
                    return
                continue  # a caller took us just now: its job is on the way
            job()
            self._pool.park(self)


class _HelperThreads:
    """Idle helper threads: a caller takes one or starts a new one, never waits for a busy one.

    Never a fixed-size pool: a coroutine running on a helper may call sync code that calls
    run_async_safe again, and callers in other threads (the ``threads`` pool) must not queue
    behind each other, so a call always gets a thread of its own for its whole duration.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Helper] = []

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            helper = self._idle.pop() if self._idle else None
        if helper is None:
            helper = _Helper(self)
            helper.start()
        helper.jobs.put(job)

    def park(self, helper: _Helper) -> None:
        with self._lock:
            self._idle.append(helper)

    def retire(self, helper: _Helper) -> bool:
        with self._lock:
            if helper in self._idle:
                self._idle.remove(helper)
                return True
            return False

    def forget_after_fork(self) -> None:
        # A forked child (Celery's prefork pool) has none of its parent's threads: handing a
        # job to one of them would wait forever.
        self._lock = threading.Lock()
        self._idle = []


_helpers = _HelperThreads()
if _gevent_patched() is not None:
    # Before any task can start a loop: Celery patches before it imports the app's tasks.
    _running_loop_per_greenlet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_helpers.forget_after_fork)

_PENDING = "pending"
_RUNNING = "running"
_DONE = "done"
_ABANDONED = "abandoned"


def _describe(obj: object) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not hide the real mistake
        text = f"<{type(obj).__qualname__} object (repr failed)>"
    return text if len(text) <= 200 else text[:197] + "..."


def _not_a_coroutine(obj: object) -> TypeError:
    given = f"got {type(obj).__name__}: {_describe(obj)}"
    name = getattr(obj, "__name__", None)
    if inspect.iscoroutinefunction(obj) and isinstance(name, str):
        hint = f"that is an async function, not a coroutine: pass {name}(), not {name}"
    else:
        hint = "pass a coroutine object, i.e. call the async function: coro(), not coro"
    return TypeError(f"run_async_safe() expects a coroutine object, {given} ({hint})")


class _ThreadCall(Generic[T]):
    """One coroutine run on a private loop in a private thread, plus the caller's handle on it.

    All state transitions happen under ``_lock`` so the caller can cancel (or abandon) the
    coroutine at any moment without racing the helper thread's start-up or shutdown.
    """

    def __init__(
        self,
        coro: Coroutine[Any, Any, T],
        ctx: contextvars.Context,
        debug: bool,
    ) -> None:
        self._coro = coro
        self._ctx = ctx
        self._debug = debug
        self._lock = threading.Lock()
        self._state = _PENDING
        self._task: asyncio.Task[T] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def thread_main(self) -> None:
        try:
            # Same Runner set-up as the no-loop path, so both paths give the coroutine the same
            # environment: a running loop, but no "current loop" set for the thread.
            with asyncio.Runner(debug=self._debug, loop_factory=asyncio.new_event_loop) as runner:
                self.result = runner.run(self._supervise(), context=self._ctx)
        except BaseException as exc:  # everything, incl. KeyboardInterrupt, goes to the caller
            self.error = exc
        finally:
            with self._lock:
                never_started = self._state == _PENDING
                if never_started:
                    self._state = _ABANDONED
            if never_started:
                # The loop could not even be created; close the coroutine so it does not
                # trigger a "never awaited" warning on top of the real error.
                self._coro.close()
            self.done.set()

    async def _supervise(self) -> T:
        with self._lock:
            if self._state != _PENDING:
                # The caller gave up before we got here and has closed the coroutine.
                raise asyncio.CancelledError
            self._state = _RUNNING
            self._task = cast("asyncio.Task[T]", asyncio.current_task())
            self._loop = asyncio.get_running_loop()
        try:
            return await self._coro
        finally:
            with self._lock:
                self._state = _DONE
                self._task = None

    def abort(self) -> None:
        """Called from the caller thread when it is interrupted while waiting."""
        close_coro = False
        with self._lock:
            if self._state == _PENDING:
                self._state = _ABANDONED
                close_coro = True
            elif self._state == _RUNNING and self._task is not None and self._loop is not None:
                # Holding the lock guarantees the task is still inside ``await coro``, so the
                # loop is running and cannot be closed under our feet.
                self._loop.call_soon_threadsafe(self._task.cancel)
        if close_coro:
            self._coro.close()


def _run_in_helper_thread(coro: Coroutine[Any, Any, T], debug: bool) -> T:
    # Copy the caller's context here, in the caller's thread: a worker thread has its own,
    # empty context, which is how executor-based runners lose request/run ids.
    call = _ThreadCall(coro, contextvars.copy_context(), debug)
    try:
        # A thread of its own for this call (see _HelperThreads), with a fresh loop; under
        # gevent a greenlet, with a running loop of its own (see _running_loop_per_greenlet).
        _helpers.submit(call.thread_main)
        # Wait on our own Event: it wakes as soon as the call is done, and a signal handler's
        # exception (Celery's soft time limit) interrupts the wait promptly.
        while not call.done.wait(_POLL_SECONDS):
            pass
    except BaseException:
        call.abort()
        call.done.wait(_CANCEL_GRACE_SECONDS)
        raise
    error = call.error
    if error is not None:
        # Drop our references so the traceback -> frame -> call -> error cycle is not created.
        call.error = None
        try:
            raise error
        finally:
            del error
    return cast(T, call.result)


def run_async_safe(
    coro: Coroutine[Any, Any, T],
    *,
    context: Mapping[str, object] | None = None,
) -> T:
    """Run ``coro`` to completion from synchronous code and return its result.

    * No event loop running in this thread: run it on a fresh loop in this thread.
    * A loop already running in this thread (we were called from sync code under it): run it on
      a fresh loop in a separate daemon thread, its own for the call (an idle helper thread is
      reused, one idle for 0.2 s exits), and block until it is done.

    In both cases the caller's contextvars are visible to the coroutine, exceptions (including
    ``BaseException`` subclasses) propagate unchanged, and an event loop merely *set* for this
    thread is left set and open. If the caller is interrupted while waiting on the thread path
    (a signal handler raising, e.g. Celery's ``SoftTimeLimitExceeded``), the coroutine is
    cancelled, given a bounded time to unwind, and the interrupting exception is re-raised.

    ``context`` is only used for the log line, to tie it to a job run.
    """
    # Check first, before logging or touching any loop: a mistaken argument must not run
    # anything. collections.abc.Coroutine (not asyncio.iscoroutine) because the latter also
    # accepts plain generators on 3.11.
    obj: object = coro
    if not isinstance(obj, Coroutine):
        raise _not_a_coroutine(obj)

    if _gevent_patched() is not None:
        _running_loop_per_greenlet()  # once per OS thread; it may have started a hub since
    try:
        running_loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running_loop = None

    if running_loop is None:
        logger.info(
            "run_async_safe: detected_running_loop=False, using asyncio.run() (context: %r)",
            context,
        )
        # Not asyncio.run(): it installs its loop as the thread's current loop and then sets
        # it to None, clobbering a loop a library had set (but not started) for this thread.
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            return runner.run(coro, context=contextvars.copy_context())

    # The wording "thread pool" is part of the specified log line; it is in fact one fresh
    # thread per call.
    logger.info(
        "run_async_safe: detected_running_loop=True, using thread pool (context: %r)",
        context,
    )
    return _run_in_helper_thread(coro, running_loop.get_debug())
