"""The ingestion page: rendered HTML over HTTP, then driven in headless chromium (Playwright)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import Engine, create_engine, select, update

from app.ingest import job_codes
from app.models import IngestRun
from fixtures.api import ApiTokens, RecordingEnqueue
from harness.workers.browser import ChromiumNotFoundError, launch_chromium
from harness.workers.http import UvicornServer

PAGE = "/projects/1/ingestion"
EXTERNAL_URL = re.compile(r"""(https?:)?//[^/\s"'<>]""", re.IGNORECASE)
GREEN = "rgb(17, 99, 41)"
RED = "rgb(176, 31, 38)"


@pytest.fixture
def db(clean_db: str) -> Iterator[Engine]:
    engine = create_engine(clean_db)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # No skip when chromium is missing: launch_chromium fails, saying how to install it.
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(10_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def finish_run(db: Engine, run_id: int, **values: Any) -> None:
    started = datetime(2026, 1, 27, 10, 0, tzinfo=UTC)
    defaults = {"started_at": started, "finished_at": started + timedelta(milliseconds=1234)}
    with db.begin() as conn:
        conn.execute(
            update(IngestRun).where(IngestRun.id == run_id).values(**{**defaults, **values})
        )


# --- the HTML, over HTTP ---------------------------------------------------------------------


def test_the_page_renders_the_ingestion_section(api_server: UvicornServer) -> None:
    response = httpx.get(api_server.url + PAGE)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    select = re.search(r'<select[^>]*data-testid="domain-select"[^>]*>(.*?)</select>', html, re.S)
    assert select is not None, html
    assert re.findall(r'<option value="([^"]+)">', select.group(1)) == list(job_codes())
    assert re.search(r'<input[^>]*type="password"[^>]*data-testid="token-input"', html)
    assert re.search(r'data-testid="marketplace-input"', html)
    assert 'value="demo"' in html
    assert 'data-testid="start-button"' in html
    assert 'data-testid="runs-table"' in html
    assert 'data-api-base="/api/v1/projects/1/ingest/runs"' in html


def test_nothing_is_loaded_from_elsewhere(api_server: UvicornServer) -> None:
    page = httpx.get(api_server.url + PAGE)
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)

    assert sorted(assets) == ["/static/ingestion.css", "/static/ingestion.js"]
    for text in [page.text] + [httpx.get(api_server.url + a).text for a in assets]:
        assert not EXTERNAL_URL.search(text), EXTERNAL_URL.search(text)
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy


def test_static_files_are_served(api_server: UvicornServer) -> None:
    js = httpx.get(api_server.url + "/static/ingestion.js")
    css = httpx.get(api_server.url + "/static/ingestion.css")

    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert ".status-success" in css.text and ".status-failed" in css.text


def test_the_index_opens_a_project(api_server: UvicornServer) -> None:
    index = httpx.get(api_server.url + "/")
    opened = httpx.get(api_server.url + "/projects", params={"project_id": 7})

    assert index.status_code == 200
    assert 'action="/projects"' in index.text
    assert opened.status_code == 303
    assert opened.headers["location"] == "/projects/7/ingestion"
    assert httpx.get(api_server.url + "/projects/0/ingestion").status_code == 422


# --- the page in a browser -------------------------------------------------------------------


def test_a_missing_chromium_says_how_to_install_it(tmp_path: Path) -> None:
    # The path is checked before Playwright is touched, so no Playwright object is needed.
    with pytest.raises(ChromiumNotFoundError, match=r"apt-get install -y chromium.*make test"):
        launch_chromium(None, executable=tmp_path / "chromium")  # type: ignore[arg-type]


def test_start_a_run_and_watch_it_finish(
    page: Page, api_server: UvicornServer, api_tokens: ApiTokens, db: Engine
) -> None:
    token = api_tokens.project1
    requested: list[str] = []
    page_errors: list[str] = []
    csp_violations: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.on(
        "console",
        lambda msg: (
            csp_violations.append(msg.text) if "Content Security Policy" in msg.text else None
        ),
    )

    page.goto(api_server.url + PAGE)
    page.get_by_test_id("token-input").fill(token)
    page.get_by_test_id("domain-select").select_option("stocks")
    page.get_by_test_id("marketplace-input").fill("demo")
    page.get_by_test_id("start-button").click()

    rows = page.get_by_test_id("run-row")
    expect(rows).to_have_count(1)
    row = rows.first
    expect(row).to_have_attribute("data-status", "queued")
    expect(row.get_by_test_id("run-status")).to_have_class(re.compile(r"\bstatus-queued\b"))
    expect(page.get_by_test_id("runs-table")).to_have_attribute("data-polling", "true")
    run_id = int(row.get_attribute("data-run-id") or 0)
    assert run_id > 0

    # There is no worker here: finish the run in the table, as the worker would.
    finish_run(
        db,
        run_id,
        status="success",
        duration_ms=1234,
        stats_json={"ok": True, "domain": "stocks", "rows": 42, "pages": [1, 2]},
    )

    expect(row).to_have_attribute("data-status", "success")
    status = row.get_by_test_id("run-status")
    expect(status).to_have_class(re.compile(r"\bstatus-success\b"))
    expect(status).to_have_css("color", GREEN)
    expect(row.get_by_test_id("run-duration")).to_have_text("1.23 s")
    stats = row.get_by_test_id("run-stats")
    expect(stats).to_contain_text("rows")
    expect(stats).to_contain_text("42")
    expect(stats).to_contain_text("[1,2]")
    expect(row.get_by_test_id("run-error")).to_have_text("")
    # Every shown run is terminal: the page stops polling.
    expect(page.get_by_test_id("runs-table")).to_have_attribute("data-polling", "false")

    # A second run, of the other domain, fails.
    page.get_by_test_id("domain-select").select_option("frontend_prices")
    page.get_by_test_id("start-button").click()
    expect(rows).to_have_count(2)
    newest = rows.first
    expect(newest).to_have_attribute("data-status", "queued")
    failed_id = int(newest.get_attribute("data-run-id") or 0)
    assert failed_id != run_id
    finish_run(
        db,
        failed_id,
        status="failed",
        duration_ms=65_000,
        error_message="HTTPStatusError: the source answered 503",
    )

    expect(newest).to_have_attribute("data-status", "failed")
    status = newest.get_by_test_id("run-status")
    expect(status).to_have_class(re.compile(r"\bstatus-failed\b"))
    expect(status).to_have_css("color", RED)
    expect(newest.get_by_test_id("run-duration")).to_have_text("1 min 5 s")
    expect(newest.get_by_test_id("run-error")).to_have_text(
        "HTTPStatusError: the source answered 503"
    )
    expect(page.get_by_test_id("runs-table")).to_have_attribute("data-polling", "false")

    assert token not in page.url
    assert requested, "the page made no requests"
    assert all(token not in url for url in requested), [u for u in requested if token in u]
    assert all(url.startswith(api_server.url + "/") for url in requested), requested
    assert page_errors == []
    assert csp_violations == []


def test_errors_are_shown_and_the_token_survives_a_reload(
    page: Page, api_server: UvicornServer, api_tokens: ApiTokens, api_enqueue: RecordingEnqueue
) -> None:
    page.goto(api_server.url + PAGE)
    message = page.get_by_test_id("message")
    expect(message).to_contain_text("Enter the API token")

    # A wrong token: the API's 401 is shown, nothing is started.
    page.get_by_test_id("token-input").fill("not-a-valid-token")
    page.get_by_test_id("start-button").click()
    expect(message).to_contain_text("401")
    assert api_enqueue.run_ids == []

    # The right token, then a second start of the same key: the 409 is shown.
    page.get_by_test_id("token-input").fill(api_tokens.project1)
    page.get_by_test_id("start-button").click()
    expect(page.get_by_test_id("run-row")).to_have_count(1)
    page.get_by_test_id("start-button").click()
    expect(message).to_contain_text("409")
    expect(message).to_contain_text("already has an active")
    expect(page.get_by_test_id("run-row")).to_have_count(1)

    # A bad marketplace code: the 422's reason is shown.
    page.get_by_test_id("marketplace-input").fill("has space")
    page.get_by_test_id("start-button").click()
    expect(message).to_contain_text("marketplace_code")

    # The token is kept for this tab only (sessionStorage): a reload still shows the runs.
    page.reload()
    expect(page.get_by_test_id("token-input")).to_have_value(api_tokens.project1)
    expect(page.get_by_test_id("run-row")).to_have_count(1)
    assert api_tokens.project1 not in page.url


# --- errors clear what they make stale; a narrow screen ----------------------------------------


def test_a_refused_token_clears_the_rows_it_can_no_longer_poll(
    page: Page, api_server: UvicornServer, api_tokens: ApiTokens
) -> None:
    page.goto(api_server.url + PAGE)
    page.get_by_test_id("token-input").fill(api_tokens.project1)
    page.get_by_test_id("start-button").click()
    expect(page.get_by_test_id("run-row")).to_have_count(1)  # queued: nothing runs it here

    page.get_by_test_id("token-input").fill("no-longer-valid")
    page.get_by_test_id("token-input").press("Enter")

    expect(page.get_by_test_id("message")).to_contain_text("401")
    expect(page.get_by_test_id("run-row")).to_have_count(0)
    expect(page.get_by_test_id("runs-empty")).to_be_hidden()
    expect(page.get_by_test_id("runs-table")).to_have_attribute("data-polling", "false")


def test_a_database_that_does_not_answer_is_said_not_no_runs(
    page: Page, api_tokens: ApiTokens, redis_url: str
) -> None:
    from app.api import create_app
    from app.config import Settings

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(
        database_url=f"postgresql+psycopg2://postgres@127.0.0.1:{port}/ingest",
        broker_url=redis_url,
        api_tokens=api_tokens.spec(),
    )
    with UvicornServer(create_app(settings, enqueue=RecordingEnqueue())) as server:
        page.goto(server.url + PAGE)
        page.get_by_test_id("token-input").fill(api_tokens.project1)
        page.get_by_test_id("token-input").press("Enter")

        message = page.get_by_test_id("message")
        expect(message).to_contain_text("503")
        expect(message).to_contain_text("the database did not answer")
        expect(page.get_by_test_id("runs-empty")).to_be_hidden()


def test_a_narrow_screen_keeps_the_table_readable(
    browser: Browser,
    api_server: UvicornServer,
    api_tokens: ApiTokens,
    db: Engine,
    request: pytest.FixtureRequest,
) -> None:
    context = browser.new_context(viewport={"width": 420, "height": 800})
    try:
        page = context.new_page()
        page.goto(api_server.url + PAGE)
        page.get_by_test_id("token-input").fill(api_tokens.project1)
        page.get_by_test_id("start-button").click()
        expect(page.get_by_test_id("run-row")).to_have_count(1)
        error = (
            "SourceUnavailableError: marketplace answered 503 Service Unavailable for "
            "https://marketplace.example/api/v2/frontend_prices?page=17&per_page=500 "
            "after 3 attempts; the last body was: upstream_connect_error_or_disconnect_reset"
        )
        with db.begin() as conn:
            run_id = conn.execute(select(IngestRun.id)).scalar_one()
        finish_run(db, run_id, status="failed", error_message=error, duration_ms=1234)
        page.reload()
        cell = page.get_by_test_id("run-error").first
        expect(cell).to_contain_text("SourceUnavailableError")

        # Nothing spills out of the card: the table scrolls inside its own box.
        spill = page.evaluate(
            "() => { const card = document.querySelector('[data-testid=runs-wrap]')"
            ".closest('.card'); return card.scrollWidth - card.clientWidth; }"
        )
        assert spill <= 1, f"the table spills {spill} px out of its card at 420 px"
        # The error reads as lines of words: wide enough, and not one character per line.
        box = cell.bounding_box()
        assert box is not None and box["width"] >= 200, box
        line_height = page.evaluate(
            "el => parseFloat(getComputedStyle(el).lineHeight) || 20",
            cell.element_handle(),
        )
        assert box["height"] / line_height <= 12, f"{box['height'] / line_height:.0f} lines"
        reports = request.config.rootpath / "reports"
        reports.mkdir(exist_ok=True)
        page.screenshot(path=str(reports / "ui-narrow-420.png"), full_page=True)
    finally:
        context.close()
