"""The UI's routes: ``/`` (open a project), ``/projects/{id}/ingestion``, and ``/static``.

The pages hold no data and need no token: the browser asks for the token, keeps it in
``sessionStorage`` and sends it only as the ``Authorization`` header of the API calls, so it
never appears in a URL, a page or a server log. Everything the pages load comes from this
server, which the Content-Security-Policy enforces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app.ingest import job_codes
from app.models import MAX_INT

__all__ = ["CONTENT_SECURITY_POLICY", "STATIC_DIR", "TEMPLATES_DIR", "mount_ui"]

_HERE: Final = Path(__file__).resolve().parent
TEMPLATES_DIR: Final = _HERE / "templates"
STATIC_DIR: Final = _HERE / "static"

DEFAULT_MARKETPLACE: Final = "demo"
POLL_INTERVAL_MS: Final = 1000

# Only this server: scripts, styles and API calls from 'self', nothing from the internet,
# no inline script (the page passes its data in data-* attributes instead).
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

_templates = Jinja2Templates(directory=str(TEMPLATES_DIR))

router = APIRouter(include_in_schema=False)

ProjectIdPath = Annotated[int, PathParam(ge=1, le=MAX_INT)]


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> HTMLResponse:
    """Open a project's ingestion page (there is no project table to list)."""
    return _templates.TemplateResponse(request, "index.html", {}, headers=_PAGE_HEADERS)


@router.get("/projects")
def open_project(project_id: Annotated[int, Query(ge=1, le=MAX_INT)]) -> RedirectResponse:
    """The index form's target: on to that project's page."""
    return RedirectResponse(f"/projects/{project_id}/ingestion", status_code=303)


@router.get("/projects/{project_id}/ingestion", response_class=HTMLResponse)
def ingestion_page(request: Request, project_id: ProjectIdPath) -> HTMLResponse:
    """The ingestion section: pick a domain, start a run, watch the runs table."""
    context = {
        "project_id": project_id,
        "job_codes": job_codes(),
        "default_marketplace": DEFAULT_MARKETPLACE,
        "api_base": f"/api/v1/projects/{project_id}/ingest/runs",
        "poll_ms": POLL_INTERVAL_MS,
    }
    return _templates.TemplateResponse(request, "ingestion.html", context, headers=_PAGE_HEADERS)


def mount_ui(app: FastAPI) -> None:
    """Add the pages and ``/static`` to ``app``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
