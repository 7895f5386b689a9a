"""What the worker shim can make a run's job raise from inside: the exceptions that are not an
``Exception`` and that the field reports as leaving runs ``running``.

A message with the ``harness_job_fault`` header runs the job as usual, and once it has started
(:data:`FAULT_AFTER_S` into it) the job's coroutine is cancelled and the fault is raised from
inside the coroutine the Target's runner was given, as the job itself would raise it:

- ``cancelled``: ``asyncio.CancelledError``, as a job that awaits something cancelled under it;
- ``system_exit``: ``SystemExit(3)``, as a library that calls ``sys.exit(3)``;
- ``keyboard_interrupt``: ``KeyboardInterrupt``, what Python raises where the job runs when
  SIGINT arrives with its default handler;
- ``hang``: no exception: the job blocks its thread (:func:`hang_here`, up to
  :data:`HANG_S`), as a job stuck in a blocking call does, for the deadline's stack dump.

The runner is wrapped once, at the worker's start (:func:`wrap_runner`); the fault of the
message being run is carried by a context variable, so runs in flight at once (threads, gevent)
never see each other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Final, TypeVar

from harness.core.errors import UsageError
from harness.workers.loopmodes import message_header

__all__ = [
    "FAULT_AFTER_S",
    "HANG_S",
    "JOB_FAULT_HEADER",
    "JobFault",
    "hang_here",
    "job_fault_for_request",
    "parse_job_fault",
    "raising",
    "wrap_runner",
]

T = TypeVar("T")

JOB_FAULT_HEADER: Final = "harness_job_fault"
# Long enough for the job to have claimed its connections and sent its first request.
FAULT_AFTER_S: Final = 0.05


class JobFault(enum.StrEnum):
    CANCELLED = "cancelled"
    SYSTEM_EXIT = "system_exit"
    KEYBOARD_INTERRUPT = "keyboard_interrupt"
    HANG = "hang"


#: How long a ``hang`` blocks: far past any test's deadline, yet not forever.
HANG_S: Final = 600.0


def hang_here() -> None:
    """Block the calling thread, where a worker's stack dump shows it by this name."""
    time.sleep(HANG_S)


# The exit code a job's SystemExit carries, so that the error message can be checked for it.
SYSTEM_EXIT_CODE: Final = 3

_current: contextvars.ContextVar[JobFault | None] = contextvars.ContextVar(
    "harness_job_fault", default=None
)


def parse_job_fault(value: str) -> JobFault:
    try:
        return JobFault(value)
    except ValueError:
        raise UsageError(
            f"unknown job fault {value!r} in the {JOB_FAULT_HEADER} header; "
            f"valid: {', '.join(JobFault)}"
        ) from None


def job_fault_for_request(request: Any) -> JobFault | None:
    """The fault a task message asks for, from its headers (as for the loop mode)."""
    value = message_header(request, JOB_FAULT_HEADER)
    return None if value is None else parse_job_fault(str(value))


def _exception(fault: JobFault) -> BaseException:
    if fault is JobFault.CANCELLED:
        return asyncio.CancelledError()
    if fault is JobFault.SYSTEM_EXIT:
        return SystemExit(SYSTEM_EXIT_CODE)
    return KeyboardInterrupt()


async def _faulty(fault: JobFault, job: Coroutine[Any, Any, T]) -> T:
    task = asyncio.ensure_future(job)
    await asyncio.wait({task}, timeout=FAULT_AFTER_S)
    if task.done():  # the job ended first: no fault to inject mid-run, say so loudly
        task.result()
        raise RuntimeError(f"the job ended within {FAULT_AFTER_S} s: no {fault} to inject")
    if fault is JobFault.HANG:
        hang_here()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise _exception(fault)


def wrap_runner(runner: Callable[..., T]) -> Callable[..., T]:
    """``runner``, which raises the current message's fault from inside the job it is given."""

    @functools.wraps(runner)
    def run(coro: Coroutine[Any, Any, T], *args: Any, **kwargs: Any) -> T:
        fault = _current.get()
        if fault is None:
            return runner(coro, *args, **kwargs)
        return runner(_faulty(fault, coro), *args, **kwargs)

    return run


@contextlib.contextmanager
def raising(fault: JobFault | None) -> Iterator[None]:
    """Within the block, the wrapped runner raises ``fault`` from inside its job."""
    token = _current.set(fault)
    try:
        yield
    finally:
        _current.reset(token)
