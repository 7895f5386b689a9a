"""harness.workers.jobfaults in-process: the fault is raised from inside the job, mid-run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from celery.app.task import Context

from harness.core.errors import UsageError
from harness.workers import jobfaults
from harness.workers.jobfaults import (
    JOB_FAULT_HEADER,
    JobFault,
    job_fault_for_request,
    raising,
    wrap_runner,
)


def _runner(coro: Any, **_: Any) -> Any:
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coro)


@pytest.mark.parametrize(
    ("fault", "raised"),
    [
        (JobFault.CANCELLED, asyncio.CancelledError),
        (JobFault.SYSTEM_EXIT, SystemExit),
        (JobFault.KEYBOARD_INTERRUPT, KeyboardInterrupt),
    ],
)
def test_the_fault_is_raised_after_the_job_started_and_the_job_is_cancelled(
    fault: JobFault, raised: type[BaseException]
) -> None:
    seen: list[str] = []

    async def job() -> str:
        seen.append("started")
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return "never"

    run = wrap_runner(_runner)
    with raising(fault), pytest.raises(raised):
        run(job(), context={"run_id": 1})
    assert seen == ["started", "cancelled"]


def test_without_a_fault_the_runner_is_called_as_it_is() -> None:
    async def job() -> int:
        return 7

    assert wrap_runner(_runner)(job()) == 7
    with raising(None):
        assert wrap_runner(_runner)(job()) == 7


def test_a_job_that_ends_before_the_fault_is_a_loud_error() -> None:
    async def job() -> int:
        return 7

    with raising(JobFault.CANCELLED), pytest.raises(RuntimeError, match="no cancelled to inject"):
        wrap_runner(_runner)(job())


def test_the_fault_comes_from_the_message_header() -> None:
    assert job_fault_for_request(Context(**{JOB_FAULT_HEADER: "system_exit"})) == (
        JobFault.SYSTEM_EXIT
    )
    assert job_fault_for_request(Context(headers={JOB_FAULT_HEADER: "cancelled"})) == (
        JobFault.CANCELLED
    )
    assert job_fault_for_request(Context()) is None
    with pytest.raises(UsageError, match=r"unknown job fault 'nope'.*valid: cancelled"):
        job_fault_for_request(Context(**{JOB_FAULT_HEADER: "nope"}))


def test_hang_blocks_the_jobs_thread_in_hang_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """``hang`` raises nothing: the job's thread blocks where a stack dump shows it."""
    blocked: list[float] = []

    def fake_sleep(seconds: float) -> None:  # the one piece under test: who sleeps, how long
        blocked.append(seconds)
        raise InterruptedError("stands in for the test's deadline")

    monkeypatch.setattr(jobfaults.time, "sleep", fake_sleep)

    async def job() -> str:
        await asyncio.sleep(5)
        return "never"

    with raising(JobFault.HANG), pytest.raises(InterruptedError):
        wrap_runner(_runner)(job())
    assert blocked == [jobfaults.HANG_S]
