"""The async ingestion jobs: one module per domain, dispatched on ``job_code``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from app.config import Settings, get_settings

__all__ = ["JOBS", "JobContext", "UnknownJobError", "execute_ingest_job", "job_codes"]


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a job needs to know about its run."""

    run_id: int
    project_id: int
    marketplace_code: str
    job_code: str


JobFn = Callable[[JobContext, Settings], Awaitable[dict[str, Any]]]


class UnknownJobError(ValueError):
    """The run names a job_code no job serves."""


def _registry() -> dict[str, JobFn]:
    from app.ingest import frontend_prices, stocks

    return {"frontend_prices": frontend_prices.run, "stocks": stocks.run}


JOBS: dict[str, JobFn] = {}


def job_codes() -> tuple[str, ...]:
    if not JOBS:
        JOBS.update(_registry())
    return tuple(sorted(JOBS))


async def execute_ingest_job(ctx: JobContext, settings: Settings | None = None) -> dict[str, Any]:
    """Run the job for ``ctx.job_code`` and return its stats (stored as ``stats_json``)."""
    codes = job_codes()
    job = JOBS.get(ctx.job_code)
    if job is None:
        raise UnknownJobError(
            f"unknown job_code {ctx.job_code!r}; known job codes: {', '.join(codes)}"
        )
    return await job(ctx, settings or get_settings())
