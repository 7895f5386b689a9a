"""``create_app``: the FastAPI application (API, health, UI) built from one ``Settings``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.api.auth import TokenAuthenticator
from app.api.enqueue import CeleryEnqueue, Enqueue
from app.api.health import describe_exception, health_engine
from app.api.limits import BodySizeLimit, plain_validation_errors
from app.api.routes import ApiContext, DatabaseTimeout, api_router, health_router
from app.config import Settings, get_settings

__all__ = ["create_app"]

logger = logging.getLogger("app.api")

API_TITLE = "Ingestion service"
API_VERSION = "1.0.0"
API_DESCRIPTION = """\
Start ingestion runs (`execute_ingest`) and follow them.

* **Auth**: `Authorization: Bearer <token>`, tokens from `APP_API_TOKENS` (`token=1,2;other=*`),
  each scoped to projects. No or a wrong token: 401. A project the token may not see: 404.
* **Runs** are the runbook's object: `id, status, started_at, finished_at, duration_ms,
  stats_json, error_message`, plus `project_id, marketplace_code, job_code, created_at`.
* **Times** are UTC, ISO 8601, always with microseconds and `Z`: `2026-01-27T10:00:00.000000Z`.
* **Lists** are JSON arrays, newest first; the next page is `?before_id=<id of the last item>`.
"""


def create_app(settings: Settings | None = None, *, enqueue: Enqueue | None = None) -> FastAPI:
    """The service's ASGI app.

    ``settings`` defaults to the environment's (``APP_*``); everything the app touches (the
    database, the broker, the tokens) comes from this one object, never from a global read
    later. ``enqueue`` defaults to ``CeleryEnqueue(settings.broker_url)``; tests pass their own.
    A malformed ``APP_API_TOKENS`` fails here, at startup, not on the first request.
    """
    settings = settings if settings is not None else get_settings()
    scopes = settings.token_scopes()
    if not scopes:
        logger.warning("APP_API_TOKENS is empty: every API request will be refused with 401")
    ctx = ApiContext(
        settings=settings,
        auth=TokenAuthenticator(scopes),
        enqueue=enqueue if enqueue is not None else CeleryEnqueue(settings.broker_url),
        health_engine=health_engine(settings.database_url),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.health_engine.dispose()
        # Threads stuck on a hung server are not waited for; queued work is dropped.
        ctx.db_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title=API_TITLE,
        version=API_VERSION,
        summary="Start ingestion runs and follow them; the ingestion page for people.",
        description=API_DESCRIPTION,
        # Swagger UI and ReDoc load their scripts from a CDN; nothing here may come from the
        # internet. The document itself stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.api = ctx
    app.include_router(api_router)
    app.include_router(health_router)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(PoolTimeoutError, _database_unavailable)
    app.add_exception_handler(DatabaseTimeout, _database_unavailable)
    app.add_exception_handler(RequestValidationError, plain_validation_errors)
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)

    # Imported here: the UI is part of this app, but app.ui must not depend on app.api's import.
    from app.ui import mount_ui

    mount_ui(app)
    return app


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # A database that is down is the service's condition, not a bug: say so, as a 503.
    reason = str(exc) if isinstance(exc, DatabaseTimeout) else describe_exception(exc)
    logger.error("%s %s: the database did not answer: %s", request.method, request.url.path, reason)
    return JSONResponse(
        {"detail": f"the database did not answer: {reason}"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
    )
