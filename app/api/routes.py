"""The HTTP endpoints: ingestion runs under ``/api/v1`` and ``/healthz``.

The runs' endpoints do their blocking SQLAlchemy and kombu calls in a thread pool of their own
and wait for them at most ``APP_API_DB_TIMEOUT_S``: a database that hangs (stopped, locked)
gets a 503 that says so in seconds, and the stuck thread is left to finish or fail on its own.
A start that was not answered in time is never carried out later: its insert is refused by the
database once the deadline has passed, and a run inserted just before it is not enqueued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, TypeVar, cast

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from app.api import health, store
from app.api.auth import Principal, TokenAuthenticator
from app.api.enqueue import Enqueue
from app.api.schemas import MAX_BIGINT, MAX_INT, ErrorOut, HealthOut, RunCreate, RunOut, RunStatus
from app.clock import utcnow
from app.config import Settings
from app.db import get_engine

__all__ = ["ApiContext", "DatabaseTimeout", "api_router", "health_router"]

T = TypeVar("T")

logger = logging.getLogger("app.api")

DEFAULT_LIST_LIMIT: Final = 20


@dataclass(frozen=True, slots=True)
class ApiContext:
    """What the endpoints need, built once by ``create_app`` and kept on ``app.state.api``."""

    settings: Settings
    auth: TokenAuthenticator
    enqueue: Enqueue
    health_engine: Engine
    # The runs' database work; a thread stuck on a hung server is not one of Starlette's.
    db_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=16, thread_name_prefix="api-db")
    )

    def engine(self) -> Engine:
        # Asked for on every request rather than kept: app.db owns the process's engine and
        # replaces it after a fork (prefork) or when another URL is asked for.
        return get_engine(self.settings.database_url)


class DatabaseTimeout(Exception):
    """The database did not answer a request's work within ``APP_API_DB_TIMEOUT_S``."""


async def _bounded(ctx: ApiContext, work: Callable[[], T]) -> T:
    """``work()`` in the database pool, waited for at most ``api_db_timeout_s``."""
    loop = asyncio.get_running_loop()
    timeout = ctx.settings.api_db_timeout_s
    try:
        return await asyncio.wait_for(loop.run_in_executor(ctx.db_pool, work), timeout)
    except TimeoutError:
        raise DatabaseTimeout(
            f"no answer within {timeout:g} s (APP_API_DB_TIMEOUT_S); try again later, "
            "GET /healthz says what is down"
        ) from None


def _context(request: Request) -> ApiContext:
    return cast(ApiContext, request.app.state.api)


Ctx = Annotated[ApiContext, Depends(_context)]

_bearer = HTTPBearer(
    auto_error=False,  # we answer 401 ourselves, with the WWW-Authenticate challenge
    scheme_name="bearerAuth",
    description="A token from APP_API_TOKENS (`token=1,2;other=*`), scoped to projects.",
)


def _principal(
    ctx: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    return ctx.auth.authenticate(credentials.credentials if credentials is not None else None)


def _visible_project(
    ctx: Ctx,
    principal: Annotated[Principal, Depends(_principal)],
    project_id: Annotated[int, Path(ge=1, le=MAX_INT, description="The project's id.")],
) -> int:
    ctx.auth.require_project(principal, project_id)
    return project_id


ProjectId = Annotated[int, Depends(_visible_project)]

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    status.HTTP_401_UNAUTHORIZED: {"model": ErrorOut, "description": "No token, or a wrong one."},
    status.HTTP_404_NOT_FOUND: {
        "model": ErrorOut,
        "description": "No such run, or a project the token may not see (the same answer).",
    },
    status.HTTP_503_SERVICE_UNAVAILABLE: {
        "model": ErrorOut,
        "description": "The database (or, when starting a run, the broker) did not answer.",
    },
}

api_router = APIRouter(prefix="/api/v1", tags=["ingest runs"], responses=_ERRORS)


def _run_url(project_id: int, run_id: int) -> str:
    return f"/api/v1/projects/{project_id}/ingest/runs/{run_id}"


def _broker_error_message(reason: str, max_len: int) -> str:
    text = (
        "enqueue failed: the broker was unreachable, so the run was never sent to a worker "
        f"({reason})"
    )
    return text if len(text) <= max_len else text[: max_len - 3] + "..."


@api_router.post(
    "/projects/{project_id}/ingest/runs",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Start an ingestion run",
    operation_id="createRun",
    responses={
        status.HTTP_400_BAD_REQUEST: {
            "model": ErrorOut,
            "description": "The body could not be read at all (not UTF-8); invalid JSON is 422.",
        },
        status.HTTP_409_CONFLICT: {
            "model": ErrorOut,
            "description": "This project, marketplace and job already have an active run.",
        },
        status.HTTP_503_SERVICE_UNAVAILABLE: {
            "model": ErrorOut,
            "description": "The broker was unreachable (the run was recorded as failed), or "
            "the database did not answer.",
        },
    },
)
async def create_run(
    project_id: ProjectId, body: RunCreate, ctx: Ctx, response: Response
) -> RunOut:
    """Create a ``queued`` run and enqueue ``execute_ingest`` for it.

    The answer is the run as it is right after enqueueing: ``queued``, unless a fast worker has
    already claimed it. At most one run per project, marketplace and job is active; the database
    enforces that, and a second start answers 409 naming the active run.
    """
    deadline = utcnow() + timedelta(seconds=ctx.settings.api_db_timeout_s)
    run = await _bounded(ctx, lambda: _start_run(ctx, project_id, body, deadline))
    response.headers["Location"] = _run_url(project_id, int(run["id"]))
    return RunOut.model_validate(run)


def _start_run(
    ctx: ApiContext, project_id: int, body: RunCreate, deadline: datetime
) -> dict[str, Any]:
    """Insert, enqueue, record the task id: the start's blocking part, in the database pool."""
    engine = ctx.engine()
    try:
        run = store.create_run(
            engine,
            project_id=project_id,
            marketplace_code=body.marketplace_code,
            job_code=body.job_code,
            not_after=deadline,
        )
    except store.StartExpired as exc:
        raise DatabaseTimeout("the run's insert reached the database after the deadline") from exc
    except store.ActiveRunExists as exc:
        which = f" (run {exc.active_run_id})" if exc.active_run_id is not None else ""
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"project {project_id} already has an active {body.job_code} run on marketplace "
            f"{body.marketplace_code!r}{which}; wait until it finishes",
        ) from exc

    run_id = int(run["id"])
    if utcnow() >= deadline:
        # Inserted, but nobody is waiting for the answer any more (they got a 503): sent now,
        # it would run a start its caller was told had failed.
        store.mark_enqueue_failed(
            engine,
            run_id,
            "not started: the database answered after the API had given up on the request "
            f"({ctx.settings.api_db_timeout_s:g} s, APP_API_DB_TIMEOUT_S); start the run again",
        )
        raise DatabaseTimeout(f"run {run_id} was inserted too late to start")
    try:
        task_id = ctx.enqueue(run_id)
    except Exception as exc:  # whatever the enqueue raised, take it that nothing was sent
        reason = health.describe_exception(exc)
        error = _broker_error_message(reason, ctx.settings.error_message_max_len)
        logger.error("Run %s: %s", run_id, error)
        if store.mark_enqueue_failed(engine, run_id, error):
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"the broker was unreachable ({reason}), so run {run_id} could not be "
                "enqueued and was marked failed; check the broker (APP_BROKER_URL) and start "
                "the run again",
            ) from exc
        # A worker claimed the run, so the message got through after all: report the run.
        logger.warning("Run %s: enqueue raised but a worker already claimed the run", run_id)
        task_id = None

    run = store.record_task_id(engine, run_id, task_id)
    logger.info(
        "Run %s queued: project %s, job %s, marketplace %s, task %s",
        run_id,
        project_id,
        body.job_code,
        body.marketplace_code,
        task_id,
    )
    return run


@api_router.get(
    "/projects/{project_id}/ingest/runs", summary="List a project's runs", operation_id="listRuns"
)
async def list_runs(
    project_id: ProjectId,
    ctx: Ctx,
    limit: Annotated[int, Query(ge=1, le=100, description="How many runs, 1 to 100.")] = (
        DEFAULT_LIST_LIMIT
    ),
    run_status: Annotated[
        RunStatus | None, Query(alias="status", description="Only runs in this status.")
    ] = None,
    before_id: Annotated[
        int | None,
        Query(
            ge=1,
            le=MAX_BIGINT,
            description="Paging cursor: the runs after (older than) this run of the project; "
            "pass the id of the last run of the previous page.",
        ),
    ] = None,
) -> list[RunOut]:
    """The project's runs, newest first (``created_at``, then ``id``), as a bare JSON array.

    An array, not an ``{"items": ...}`` envelope, because the runbook's check reads
    ``?limit=1`` as "the last run of the project": with an array the answer is that run's
    object, exactly as the runbook shows it, inside ``[...]`` (``jq '.[0]'``), the same object
    the run endpoint returns. Paging needs no envelope: the next page is
    ``?before_id=<id of the last item>``; a page shorter than ``limit`` is the last one. A
    ``before_id`` that is not a run of this project gives an empty page.
    """
    rows = await _bounded(
        ctx,
        lambda: store.list_runs(
            ctx.engine(), project_id=project_id, limit=limit, status=run_status, before_id=before_id
        ),
    )
    return [RunOut.model_validate(row) for row in rows]


@api_router.get(
    "/projects/{project_id}/ingest/runs/{run_id}", summary="Get one run", operation_id="getRun"
)
async def get_run(
    project_id: ProjectId,
    run_id: Annotated[int, Path(ge=1, le=MAX_BIGINT, description="The run's id.")],
    ctx: Ctx,
) -> RunOut:
    """One run, in the runbook's JSON; 404 when it is not a run of this project."""
    row = await _bounded(
        ctx, lambda: store.get_run(ctx.engine(), project_id=project_id, run_id=run_id)
    )
    if row is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"run {run_id} not found in project {project_id}"
        )
    return RunOut.model_validate(row)


health_router = APIRouter(tags=["health"])


@health_router.get(
    "/healthz",
    summary="Whether the database and the broker answer",
    operation_id="healthz",
    responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"model": HealthOut}},
)
def healthz(ctx: Ctx, response: Response) -> HealthOut:
    """200 when both answer, 503 otherwise; each check gives up after about two seconds."""
    result = HealthOut(
        database=health.check_database(ctx.health_engine),
        broker=health.check_broker(ctx.settings.broker_url),
    )
    if result.database != "ok" or result.broker != "ok":
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return result
