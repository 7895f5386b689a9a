"""The event-loop conditions the task body is run under, and the function that forces one.

``run_in_mode`` is what the worker-side shim (``harness.workers.worker_app``) wraps around the task
body; it is a plain function, so each condition can also be checked in-process. ``in_process``
is the matrix's fifth cell: an ``async def`` test calling the task's function directly under
pytest-asyncio; nothing needs to be forced for it, so ``run_in_mode`` does not take it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from harness.core.cell import IN_PROCESS, LOOP_MODES, MATRIX_MODES, LoopMode
from harness.core.errors import UsageError
from harness.core.logs import (
    CLOSED_CHECK_FAILED_TEMPLATE,
    CLOSED_CHECK_OK_TEMPLATE,
    IDLE_CHECK_FAILED_TEMPLATE,
    IDLE_CHECK_OK_TEMPLATE,
    INHERITED_CHECK_FAILED_TEMPLATE,
    INHERITED_CHECK_OK_TEMPLATE,
    SHARED_LOOP_TEMPLATE,
    STRATEGY_ASYNCIO_RUN,
    STRATEGY_THREAD_POOL,
)

__all__ = [
    "DEFAULT_MODE_ENV",
    "HEADER_SOURCE",
    "IN_PROCESS",
    "LOOP_MODES",
    "LOOP_MODE_HEADER",
    "MATRIX_MODES",
    "POOL_ENV",
    "LoopMode",
    "LoopModeError",
    "expected_runner_line",
    "loop_mode_for_request",
    "make_parent_loop",
    "message_header",
    "parse_loop_mode",
    "run_in_mode",
]

T = TypeVar("T")

logger = logging.getLogger("harness.loopmodes")


# The pool the harness started the worker with (harness.workers.process sets it).
POOL_ENV: Final = "HARNESS_POOL"

# The loop a prefork worker's parent made and set before its pool forked (the worker app does
# it on import, as a preloaded app would), and the parent's pid.
_inherited: tuple[asyncio.AbstractEventLoop, int] | None = None


def make_parent_loop() -> None:
    """In the parent, before the pool forks: a loop set for the main thread, not running; every
    child inherits it (and its selector's epoll descriptor, shared with the parent)."""
    global _inherited
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    _inherited = (loop, os.getpid())


# The task message header that picks the mode, and the worker's fallback when it is absent
# (a run enqueued by the API, which knows nothing of the harness).
LOOP_MODE_HEADER: Final = "harness_loop_mode"
# How the shim's line names a mode that came from that header.
HEADER_SOURCE: Final = f"header {LOOP_MODE_HEADER}"
DEFAULT_MODE_ENV: Final = "HARNESS_DEFAULT_LOOP_MODE"


class LoopModeError(UsageError):
    """An unknown mode, or a mode that cannot be forced from where it was asked for."""


def parse_loop_mode(value: str) -> LoopMode:
    """``value`` as a :class:`LoopMode`; the error lists the valid names."""
    try:
        return LoopMode(value)
    except ValueError:
        hint = (
            " (in_process is run by the test itself, under pytest-asyncio, not in the worker)"
            if value == IN_PROCESS
            else ""
        )
        raise LoopModeError(
            f"unknown loop mode {value!r}{hint}; valid worker loop modes: {', '.join(LOOP_MODES)}"
        ) from None


def expected_runner_line(mode: str) -> tuple[bool, str]:
    """What the fixed runner logs in ``mode``: (detected_running_loop, strategy text)."""
    if mode in (
        LoopMode.NO_LOOP,
        LoopMode.IDLE_LOOP,
        LoopMode.CLOSED_LOOP,
        LoopMode.INHERITED_LOOP,
    ):
        return False, STRATEGY_ASYNCIO_RUN
    if mode in (LoopMode.RUNNING_LOOP, LoopMode.RUNNING_UVLOOP, IN_PROCESS):
        return True, STRATEGY_THREAD_POOL
    raise LoopModeError(f"unknown loop mode {mode!r}; valid modes: {', '.join(MATRIX_MODES)}")


def message_header(request: Any, name: str) -> object | None:
    """A custom header of the task message ``request`` is running, or None.

    Celery copies the message headers onto ``task.request``: a custom header is both an
    attribute (``request.get(name)``) and an entry of ``request.headers``, the dict of the
    non-Celery headers. The attribute is read first, ``headers`` covers a request built
    without it (``apply(headers=...)`` in eager mode).
    """
    if request is None:
        return None
    value: object | None = request.get(name)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def loop_mode_for_request(request: Any, env: Mapping[str, str]) -> tuple[LoopMode, str]:
    """The mode for one task message, and where it came from (for the log line)."""
    value = message_header(request, LOOP_MODE_HEADER)
    if value is not None:
        return parse_loop_mode(str(value)), HEADER_SOURCE
    default = env.get(DEFAULT_MODE_ENV, "").strip()
    if default:
        return parse_loop_mode(default), DEFAULT_MODE_ENV
    return LoopMode.NO_LOOP, "default"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _greenlets_share_the_thread() -> bool:
    """True under gevent's patching of ``threading`` (Celery's ``-P gevent``): tasks are then
    greenlets on one OS thread, and asyncio's running loop is per OS thread, so a task sees the
    running loop of any other task that is waiting inside its own."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def _thread_loop_change(loop: asyncio.AbstractEventLoop) -> str | None:
    """``None`` if ``loop`` is still the loop set for this thread, else what happened to it."""
    try:
        # Safe: set_event_loop() was called in this thread, so this never creates a loop (and a
        # closed loop that is set is returned as it is).
        current = asyncio.get_event_loop()
    except RuntimeError:
        return "no loop is set for the thread any more"
    if current is not loop:
        return f"the thread's loop was replaced by {type(current).__name__} {id(current):#x}"
    return None


def _idle_loop_state(loop: asyncio.AbstractEventLoop) -> str | None:
    """``None`` if ``loop`` is still this thread's loop and open, else what happened to it."""
    if loop.is_closed():
        return "the loop was closed"
    return _thread_loop_change(loop)


def _closed_loop_state(loop: asyncio.AbstractEventLoop) -> str | None:
    """``None`` if ``loop`` is still this thread's loop and still closed, else what changed."""
    change = _thread_loop_change(loop)
    if change is None and not loop.is_closed():
        return "the closed loop was reopened"
    return change


def _new_uvloop() -> asyncio.AbstractEventLoop:
    import uvloop  # only this mode needs it; keep the import off the other paths

    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


# Each set-loop mode's check after the run: its (ok, failed) line templates.
_IDLE_CHECK: Final = (IDLE_CHECK_OK_TEMPLATE, IDLE_CHECK_FAILED_TEMPLATE)
_CLOSED_CHECK: Final = (CLOSED_CHECK_OK_TEMPLATE, CLOSED_CHECK_FAILED_TEMPLATE)
_INHERITED_CHECK: Final = (INHERITED_CHECK_OK_TEMPLATE, INHERITED_CHECK_FAILED_TEMPLATE)


def _with_set_loop(
    loop: asyncio.AbstractEventLoop,
    fn: Callable[..., T],
    args: tuple[Any, ...],
    state: Callable[[asyncio.AbstractEventLoop], str | None],
    templates: tuple[str, str],
    label: object,
) -> T:
    """``fn(*args)`` with ``loop`` set for the thread (not running); afterwards ``state(loop)``
    says whether the thread's loop is as it was, logged with ``templates`` (INFO when it is,
    ERROR when not, never changing ``fn``'s outcome), and the thread is left with no loop."""
    asyncio.set_event_loop(loop)
    try:
        return fn(*args)
    finally:
        problem = state(loop)
        ok, failed = templates
        if problem is None:
            logger.info(ok.format(run_id=label))
        else:
            logger.error(failed.format(run_id=label, detail=problem))
        asyncio.set_event_loop(None)


def run_in_mode(mode: str, fn: Callable[..., T], *args: Any, run_id: object = None) -> T:
    """Call ``fn(*args)`` in this thread under ``mode``'s event-loop condition.

    - ``no_loop``: no loop set (``set_event_loop(None)``) and none running.
    - ``idle_loop``: a fresh loop set for the thread but not running, as after a library's
      ``get_event_loop()``. Afterwards the loop must still be set and open (the fixed runner
      must not clobber it); the check is logged on ``harness.workers.loopmodes`` (INFO when it
      holds, ERROR when not) and does not change ``fn``'s outcome.
    - ``closed_loop``: a loop set for the thread but already closed, as a library leaves it
      after ``loop.close()``. Afterwards the thread's loop must be exactly as before: the same
      loop, still closed (``closed loop check`` line, as for ``idle_loop``).
    - ``inherited_loop`` (prefork only): the loop the worker's parent made and set before the
      pool forked, as a preloaded app does, inherited by this child with the parent's epoll
      descriptor. Afterwards it must still be set and open (``inherited loop check`` line).
    - ``running_loop`` / ``running_uvloop``: ``fn`` is called (synchronously) from a coroutine
      running on a fresh asyncio / uvloop loop in this thread.

    Every mode leaves the thread with no loop set, the worker thread's normal state.
    ``run_id`` only labels the shim's lines.

    Under gevent, another run's loop can be running and visible when this run starts (see
    :func:`_greenlets_share_the_thread`): that is logged as a warning
    (``SHARED_LOOP_TEMPLATE``) and the run proceeds in it, so the runner must detect a
    running loop whatever the mode. Anywhere else a running loop is a :class:`LoopModeError`.
    """
    selected = parse_loop_mode(mode)
    label = run_id if run_id is not None else getattr(fn, "__qualname__", repr(fn))
    shared = _running_loop() is not None
    if shared and not _greenlets_share_the_thread():
        # Nothing can be forced from here: the caller's loop would stay running around fn.
        raise LoopModeError(
            f"cannot force {selected.value}: an event loop is already running in this thread; "
            "call run_in_mode from synchronous code (for the running-loop case under "
            f"pytest-asyncio, use the {IN_PROCESS} cell instead)"
        )
    if shared:
        # Another greenlet's loop, and nothing here can hide it: the run is in the running-loop
        # condition whatever was asked. A loop of its own could not even start ("Cannot run the
        # event loop while another loop is running"), so the running modes call fn as it is.
        logger.warning(SHARED_LOOP_TEMPLATE.format(run_id=label))
        if selected in (LoopMode.RUNNING_LOOP, LoopMode.RUNNING_UVLOOP):
            return fn(*args)

    if selected is LoopMode.NO_LOOP:
        asyncio.set_event_loop(None)
        try:
            return fn(*args)
        finally:
            asyncio.set_event_loop(None)

    if selected is LoopMode.IDLE_LOOP:
        loop = asyncio.new_event_loop()
        try:
            return _with_set_loop(loop, fn, args, _idle_loop_state, _IDLE_CHECK, label)
        finally:
            loop.close()

    if selected is LoopMode.CLOSED_LOOP:
        loop = asyncio.new_event_loop()
        loop.close()
        return _with_set_loop(loop, fn, args, _closed_loop_state, _CLOSED_CHECK, label)

    if selected is LoopMode.INHERITED_LOOP:
        if _inherited is None or _inherited[1] == os.getpid():
            raise LoopModeError(
                "cannot force inherited_loop: this process was not forked from a worker parent "
                "that made a loop (a prefork pool child of the harness's worker app); "
                "inherited_loop exists on the prefork pool only"
            )
        # Set again: an earlier run in this child may have unset it.
        return _with_set_loop(_inherited[0], fn, args, _idle_loop_state, _INHERITED_CHECK, label)

    async def call() -> T:
        return fn(*args)

    factory = _new_uvloop if selected is LoopMode.RUNNING_UVLOOP else asyncio.new_event_loop
    # A loop_factory keeps Runner from setting (and then clearing) the thread's current loop.
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(call())
    finally:
        asyncio.set_event_loop(None)  # whatever fn set for the thread
