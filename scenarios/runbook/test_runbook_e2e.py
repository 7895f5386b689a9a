"""The runbook's steps 2-6, done as a person does them, on the real stack, per loop mode.

Step 2 in headless chromium (Playwright driving Debian's package): open the ingestion page,
enter the token, pick ``frontend_prices`` and a marketplace, start. Then the real worker runs it
in the mode under test (its ``HARNESS_DEFAULT_LOOP_MODE``: runs the API enqueues carry no
harness header), and each step is checked as the runbook says: the worker's lines (3), the
runbook's exact SQL (4), its two curl calls made with httpx (5), the page (6). A second run on
a marketplace that keeps failing must show red with its error. The page with both runs is saved
to ``reports/runbook-<mode>.png``.
"""

from __future__ import annotations

import json
import re
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
from sqlalchemy import text

from harness.checks.assertions import assert_loop_log, assert_run_failed, assert_run_succeeded
from harness.core.logs import LOOP_MODE_TEMPLATE, LogLine, harness_lines
from harness.core.runs import RunRow
from harness.workers.loopmodes import DEFAULT_MODE_ENV
from scenarios.runbook.runbook import (
    STEP4_COLUMNS,
    STEP4_SQL,
    STEP5_CURL_LIST,
    STEP5_CURL_RUN,
    assert_runbook_run_json,
    curl_for,
    find_runbook,
    parse_curl,
)

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

    # Where it is defined: playwright.sync_api has it but leaves it out of its __all__.
    from playwright.sync_api._generated import LocatorAssertions

    from harness.workers.stack import FullStack

pytestmark = pytest.mark.integration

# One stack per mode, shared by the mode's tests (scenarios/runbook/conftest.py).
by_loop_mode = pytest.mark.parametrize(
    "runbook_mode",
    [
        pytest.param("no_loop", marks=pytest.mark.no_loop, id="no_loop"),
        pytest.param("running_loop", marks=pytest.mark.running_loop, id="running_loop"),
    ],
    scope="module",
)

DOMAIN: Final = "frontend_prices"
PROJECT_ID: Final = 1
# The page's status colours (app/ui/static/ingestion.css).
GREEN: Final = "rgb(17, 99, 41)"
RED: Final = "rgb(176, 31, 38)"
# What a run reports when the marketplace keeps failing past the client's retries.
UNAVAILABLE: Final = "SourceUnavailableError: marketplace answered 503"
TERMINAL: Final = re.compile(r"^(success|failed)$")
RUN_STARTED: Final = re.compile(r"Run (\d+) started")
# A run takes well under a second; the page polls once a second.
RUN_TIMEOUT_MS: Final = 30_000
EM_DASH: Final = "\u2014"


def expect(locator: Locator) -> LocatorAssertions:
    """Playwright's ``expect``, for a locator."""
    # Lazy: collecting this module (every pytest process does) should not import Playwright.
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


# -- the steps -------------------------------------------------------------------------------


def start_from_ui(page: Page, marketplace_code: str) -> tuple[int, Locator]:
    """Step 2: pick the domain and a marketplace, start; the run's id and its row on the page."""
    page.get_by_test_id("domain-select").select_option(DOMAIN)
    page.get_by_test_id("marketplace-input").fill(marketplace_code)
    page.get_by_test_id("start-button").click()
    message = page.get_by_test_id("message")
    expect(message).to_contain_text(f": {DOMAIN} on {marketplace_code}.")
    found = RUN_STARTED.search(message.inner_text())
    assert found is not None, f"the page did not say which run started: {message.inner_text()!r}"
    run_id = int(found.group(1))
    row = page.locator(f'[data-testid="run-row"][data-run-id="{run_id}"]')
    expect(row).to_have_count(1)
    return run_id, row


def wait_on_page(row: Locator) -> str:
    """Until the page shows the run terminal (the page's own polling); its status."""
    expect(row).to_have_attribute("data-status", TERMINAL, timeout=RUN_TIMEOUT_MS)
    return row.get_attribute("data-status") or ""


def worker_lines(stack: FullStack, run_id: int, since: int) -> list[LogLine]:
    """Step 3: the worker's log once Celery logged the run's end (after every line it wrote)."""
    task_id = stack.store.read(run_id).celery_task_id
    assert task_id, f"run {run_id} has no celery_task_id: it was never handed to the worker"
    return stack.worker.wait_for_task(task_id, since=since)


def runbook_sql(stack: FullStack, run_id: int) -> dict[str, Any]:
    """Step 4: the runbook's SELECT, exactly, with ``:run_id`` bound."""
    with stack.store.engine.connect() as conn:
        result = conn.execute(text(STEP4_SQL), {"run_id": run_id})
        columns = list(result.keys())
        rows = result.mappings().all()
    assert columns == list(STEP4_COLUMNS), columns
    assert len(rows) == 1, f"the runbook's query found {len(rows)} rows for run {run_id}"
    return dict(rows[0])


def curl(stack: FullStack, client: httpx.Client, line: str, run_id: int | None = None) -> Any:
    """Step 5: one of the runbook's curl lines, filled in as a person would, sent with httpx."""
    call = parse_curl(curl_for(line, port=stack.port, token=stack.token, run_id=run_id))
    response = client.request(call.method, call.url, headers=call.headers)
    assert response.status_code == 200, f"{call.method} {call.url}: {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def js_text(value: Any) -> str:
    """How the page's script renders a stats value (String(v), objects as JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# -- checks shared by the green and the red run -----------------------------------------------


def check_sql_matches_row(found: dict[str, Any], row: RunRow) -> None:
    for column in STEP4_COLUMNS:
        stored = getattr(row, column)
        assert found[column] == stored, (
            f"{column}: the runbook's query says {found[column]!r}, the row {stored!r}"
        )


def check_api_matches_row(body: dict[str, Any], row: RunRow) -> None:
    assert body["duration_ms"] == row.duration_ms
    assert body["stats_json"] == row.stats_json
    assert body["error_message"] == row.error_message
    for key in ("started_at", "finished_at"):
        value = getattr(row, key)
        assert value is not None
        # The API renders the stored instant in UTC with microseconds and Z.
        assert body[key] == value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), key


# -- the scenario -----------------------------------------------------------------------------


@by_loop_mode
def test_runbook_steps_2_to_6(
    runbook_mode: str, runbook_stack: FullStack, page: Page, reports_dir: Path
) -> None:
    stack = runbook_stack
    mode = runbook_mode
    requested: list[str] = []
    page_errors: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    since = stack.worker.log_mark()

    # Step 2: start a run from the UI.
    page.goto(stack.ui_url)
    page.get_by_test_id("token-input").fill(stack.token)
    page.get_by_test_id("token-save").click()
    good_code = f"rb-{mode}-ok"
    run_id, green = start_from_ui(page, good_code)
    status = wait_on_page(green)
    row = stack.store.read(run_id)
    lines = worker_lines(stack, run_id, since)
    assert status == "success", f"the page shows run {run_id} {status}: {row}"
    assert_run_succeeded(
        row,
        log=lines,
        project_id=PROJECT_ID,
        **stack.marketplace.served_stats(good_code, DOMAIN),
    )

    # Step 3: the runbook's lines in the worker's log, with the mode's runner line; the mode
    # came from the worker's default, as for any run the API enqueues.
    assert_loop_log(lines, run_id, mode)
    assert [line.headline for line in harness_lines(lines, run_id)] == [
        LOOP_MODE_TEMPLATE.format(run_id=run_id, mode=mode, source=DEFAULT_MODE_ENV)
    ]

    # Step 4: the runbook's SQL.
    found = runbook_sql(stack, run_id)
    assert found["status"] == "success"
    assert found["finished_at"] is not None
    assert found["duration_ms"] is not None
    assert found["stats_json"] and found["stats_json"]["ok"] is True, found["stats_json"]
    assert found["error_message"] is None
    check_sql_matches_row(found, row)

    # Step 5: both curl calls, with httpx against uvicorn on loopback.
    with httpx.Client(timeout=10.0) as client:
        latest = curl(stack, client, STEP5_CURL_LIST)
        one = curl(stack, client, STEP5_CURL_RUN, run_id)
    assert isinstance(latest, list) and len(latest) == 1, latest
    assert latest[0] == one, "?limit=1 and /runs/{id} disagree about the newest run"
    assert_runbook_run_json(one, run_id=run_id, project_id=PROJECT_ID, domain=DOMAIN)
    check_api_matches_row(one, row)

    # Step 6: the page shows it green, with the duration and the stats.
    badge = green.get_by_test_id("run-status")
    expect(badge).to_have_text("success")
    expect(badge).to_have_class(re.compile(r"\bstatus-success\b"))
    expect(badge).to_have_css("color", GREEN)
    duration = green.get_by_test_id("run-duration")
    expect(duration).to_have_attribute("data-duration-ms", str(row.duration_ms))
    expect(duration).not_to_have_text(EM_DASH)
    stats = green.get_by_test_id("run-stats")
    assert row.stats_json is not None
    shown = dict(
        zip(
            stats.locator("dt").all_inner_texts(),
            stats.locator("dd").all_inner_texts(),
            strict=True,
        )
    )
    assert shown == {k: js_text(v) for k, v in row.stats_json.items()}, shown
    expect(green.get_by_test_id("run-error")).to_have_text("")

    # A failing run: the marketplace keeps answering 503 for this code.
    bad_code = f"rb-{mode}-down"
    stack.marketplace.configure(bad_code, fail_always=True)
    red_id, red = start_from_ui(page, bad_code)
    red_status = wait_on_page(red)
    red_row = stack.store.read(red_id)
    red_lines = worker_lines(stack, red_id, since)
    assert red_status == "failed", f"the page shows run {red_id} {red_status}: {red_row}"
    assert_run_failed(red_row, error=UNAVAILABLE, log=red_lines)
    assert_loop_log(red_lines, red_id, mode, outcome="failed", error=red_row.error_message)
    red_found = runbook_sql(stack, red_id)
    assert red_found["status"] == "failed"
    assert red_found["finished_at"] is not None and red_found["duration_ms"] is not None
    assert red_found["stats_json"] is None
    assert UNAVAILABLE in (red_found["error_message"] or "")
    check_sql_matches_row(red_found, red_row)
    with httpx.Client(timeout=10.0) as client:
        red_latest = curl(stack, client, STEP5_CURL_LIST)
        red_one = curl(stack, client, STEP5_CURL_RUN, red_id)
    assert red_latest == [red_one]
    assert_runbook_run_json(red_one, run_id=red_id, status="failed")
    check_api_matches_row(red_one, red_row)

    red_badge = red.get_by_test_id("run-status")
    expect(red_badge).to_have_text("failed")
    expect(red_badge).to_have_class(re.compile(r"\bstatus-failed\b"))
    expect(red_badge).to_have_css("color", RED)
    expect(red.get_by_test_id("run-error")).to_have_text(red_row.error_message or "")
    expect(red.get_by_test_id("run-stats")).to_have_text(EM_DASH)
    # The green run is still green next to it; the page stopped polling (both terminal).
    expect(badge).to_have_class(re.compile(r"\bstatus-success\b"))
    expect(page.get_by_test_id("run-row")).to_have_count(2)
    expect(page.get_by_test_id("runs-table")).to_have_attribute("data-polling", "false")
    page.screenshot(path=reports_dir / f"runbook-{mode}.png", full_page=True)

    # The token travels only in the Authorization header: never in a URL, never in a log.
    token = stack.token
    assert requested, "the page made no requests"
    assert all(token not in url for url in requested), [u for u in requested if token in u]
    assert token not in page.url
    assert page_errors == []
    assert all(token not in value for value in stack.worker.env.values())
    worker_log = stack.worker.log_path.read_text(encoding="utf-8")
    assert f"Run {red_id} failed: " in worker_log  # the file read is the one the runs went to
    assert token not in worker_log
    api_log = stack.api_log_path.read_text(encoding="utf-8")
    # The access lines of the calls above are there, so their absence of the token means
    # something.
    assert f'"GET /api/v1/projects/1/ingest/runs/{red_id} HTTP/1.1" 200' in api_log, api_log
    assert '"POST /api/v1/projects/1/ingest/runs HTTP/1.1" 202' in api_log, api_log
    assert token not in api_log
    assert "Authorization" not in api_log


def test_the_copied_runbook_text_is_the_runbook(request: pytest.FixtureRequest) -> None:
    """STEP4_SQL and the curl lines are the runbook's, character for character."""
    path = find_runbook(request.config.rootpath)
    if path is None:
        pytest.skip(
            "the runbook file (shared/spec/execute-ingest-runbook.ru.md next to this "
            "checkout) is not here to compare with"
        )
    runbook = path.read_text(encoding="utf-8")
    for name, excerpt in (
        ("STEP4_SQL", STEP4_SQL),
        ("STEP5_CURL_LIST", STEP5_CURL_LIST),
        ("STEP5_CURL_RUN", STEP5_CURL_RUN),
    ):
        assert excerpt in runbook, f"{name} is no longer the text of {path}"
