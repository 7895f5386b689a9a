"""The harness proves its power: against the pre-fix runner its own verdict flips.

``harness matrix --runner prefix`` runs ``test_success`` in every worker cell the session
selected (by default: every worker loop mode x prefork, solo, threads x redis) with the pre-fix
runner (a plain ``asyncio.run()``, injected into the workers through ``HARNESS_RUNNER=prefix``)
on this session's Postgres and Redis. Every ``running_*`` cell must fail exactly as the runbook
describes the old bug -- status ``failed``, the RuntimeError in ``error_message`` and in the
worker log. Every ``idle_loop``, ``closed_loop`` and ``inherited_loop`` cell must fail on the
shim's loop check: ``asyncio.run()`` runs the job but leaves the thread with no loop set,
clobbering the loop a library had left set (the old code's second defect). ``no_loop`` still
passes. A harness that could not see the bug would report all green here.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Final

import pytest

from app.tasks.ingest import run_ingest
from fixtures.worker import InProcessRuns, prefix_run_async_safe
from harness.core.cell import mode_applies
from harness.core.config import HarnessConfig
from harness.core.logs import FAILED_TEMPLATE, FORBIDDEN_TEXT
from harness.pytest.plugin import harness_config_key
from harness.services import Services
from harness.workers.loopmodes import LOOP_MODES
from harness.workers.marketplace import MarketplaceServer
from scenarios._child import ROOT, run_harness
from scenarios.expect import DOMAIN

pytestmark = pytest.mark.integration

PRE_FIX_ERROR: Final = f"RuntimeError: {FORBIDDEN_TEXT}"
# What the shim's loop checks say after asyncio.run() (a second defect of the old code).
CLOBBERED: Final = {
    "idle_loop": "replaced or closed (no loop is set for the thread any more)",
    "closed_loop": "changed (no loop is set for the thread any more)",
    "inherited_loop": "replaced or closed (no loop is set for the thread any more)",
}
# Generous: the child starts three workers and stops them; it takes a few seconds.
CHILD_TIMEOUT_S: Final = 180


def _junit_failures(path: Path) -> dict[str, str]:
    """Test name (with its cell id) -> the full failure text, from the harness's JUnit XML."""
    failures = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        for failure in case.iter("failure"):
            failures[str(case.get("name"))] = failure.text or ""
    return failures


def _cell_id(cell: dict[str, Any]) -> str:
    return f"{cell['loop_mode']}-{cell['pool']}-{cell['broker']}"


def _child_cells(
    config: HarnessConfig, services: Services
) -> tuple[list[str], list[str], list[str]]:
    """The session's own selection of worker cells (so --pool/--broker/--loop-mode narrow the
    proof as they narrow the matrix), skipping when it cannot show anything."""
    modes: list[str] = [m for m in LOOP_MODES if m in config.loop_modes]
    brokers = [b for b in config.brokers if b == "redis" or services.amqp_url is not None]
    if not any(m.startswith("running_") for m in modes):
        pytest.skip("the pre-fix runner only fails with a running loop: select a running_* mode")
    if not brokers:
        pytest.skip("no selected broker answers here (amqp needs HARNESS_AMQP_URL)")
    return modes, list(config.pools), brokers


def test_prefix_runner_fails_exactly_the_running_cells(
    request: pytest.FixtureRequest, services: Services, tmp_path: Path
) -> None:
    modes, pools, brokers = _child_cells(request.config.stash[harness_config_key], services)
    report = tmp_path / "prefix.json"
    junit = tmp_path / "prefix-junit.xml"
    command = [
        "matrix",
        "--no-services", "--services=external", "--runner=prefix",
        f"--loop-mode={','.join(modes)}", f"--pool={','.join(pools)}",
        f"--broker={','.join(brokers)}", "-n", "0", "-k", "test_success", f"--report={report}",
        # The harness's own JUnit holds the full failure texts (the JSON keeps the first lines
        # of each). The scenarios need none of the API tests' plugins; not loading them saves
        # the child ~1.5 s.
        f"--junit={junit}",
        "--", "-p", "no:schemathesis", "-p", "no:hypothesispytest", "-p", "no:anyio",
    ]  # fmt: skip
    child = run_harness(services, *command, timeout=CHILD_TIMEOUT_S)
    output = f"exit code {child.returncode}\n--- stdout\n{child.stdout}\n--- stderr\n{child.stderr}"
    assert report.exists(), f"`harness matrix` wrote no report:\n{output}"
    document = json.loads(report.read_text(encoding="utf-8"))
    assert document["errors"] == [], output
    assert child.returncode == 1, f"the matrix must report a failure (exit 1):\n{output}"

    cells = {_cell_id(cell): cell for cell in document["cells"]}
    want = [(m, p, b) for m in modes for p in pools for b in brokers if mode_applies(m, p)]
    assert len(cells) == len(want), output
    verdict = {cell_id: cell["status"] for cell_id, cell in cells.items()}
    expected = {
        cell_id: "pass" if cell["loop_mode"] == "no_loop" else "fail"
        for cell_id, cell in cells.items()
    }
    assert verdict == expected, f"the harness's verdict is not the expected one:\n{output}"

    failures = _junit_failures(junit)
    for cell_id, cell in cells.items():
        if cell["status"] != "fail":
            continue
        [(test, message)] = [(f["test"], f["message"]) for f in cell["failures"]]
        assert test.endswith(f"test_success[{cell_id}]"), test
        if cell["loop_mode"] in CLOBBERED:
            # asyncio.run() ran the job, and then set the thread's loop to None: the loop a
            # library had left set is gone. The row is fine; the shim's check says so.
            assert "the loop-mode shim's lines for run" in message, message
            assert CLOBBERED[cell["loop_mode"]] in failures[f"test_success[{cell_id}]"], message
            continue
        # The harness's own one-line verdict says why: the row failed with the old bug.
        assert "status is 'failed', expected 'success'" in message, message
        assert PRE_FIX_ERROR in message, message
        # The full text also holds the run's worker log lines: "Run N failed: RuntimeError...".
        full = failures[f"test_success[{cell_id}]"]
        assert f"failed: {PRE_FIX_ERROR}" in full, full
        assert "detected_running_loop" not in full, "the pre-fix runner logs no runner line"

    # The other reports say the same: the Markdown's running_* rows are red, and the HTML
    # report, clicked in Chromium, opens a failed cell with the row's error and the log lines.
    markdown = report.with_suffix(".md").read_text(encoding="utf-8")
    for line in markdown.splitlines():
        if line.startswith(("| running_loop |", "| running_uvloop |")):
            assert "✅" not in line and "❌ FAIL" in line, line
        elif line.startswith("| no_loop |"):
            assert "❌" not in line, line
    failed = next(c for c in cells if c.startswith("running_loop-"))
    _click_a_failed_cell(report.with_suffix(".html"), failed, ROOT / "reports")


def _click_a_failed_cell(page_path: Path, cell_id: str, screenshots: Path) -> None:
    """Load the HTML report from disk in headless Chromium, click ``cell_id``, read its panel."""
    from playwright.sync_api import expect, sync_playwright

    from harness.workers.browser import launch_chromium

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(page_path.as_uri())
            expect(page.locator("#verdict")).to_have_text("FAIL")
            expect(page.locator("#facts")).to_contain_text("celery")
            expect(page.locator("#facts")).to_contain_text("external")
            button = page.locator(f'button[data-target="cell-{cell_id}"]')
            expect(button).to_have_attribute("data-status", "fail")
            red = button.evaluate("b => getComputedStyle(b).backgroundColor")
            assert red == "rgb(255, 206, 203)", red
            panel = page.locator(f"#cell-{cell_id}")
            expect(panel).to_be_hidden()
            button.click()
            expect(panel).to_be_visible()
            expect(button).to_have_class("cell fail selected")
            text = panel.inner_text()
            assert "status is 'failed', expected 'success'" in text, text
            assert f"failed: {PRE_FIX_ERROR}" in text, "the run's worker log lines are shown"
            assert page.locator("section.cell-detail:visible").count() == 1
            screenshots.mkdir(parents=True, exist_ok=True)
            shot = screenshots / "matrix-prefix-failed-cell.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            # Self-contained: the page fetched nothing but itself.
            assert requested == [page_path.as_uri()], requested
        finally:
            browser.close()


@pytest.mark.asyncio
async def test_prefix_runner_fails_the_in_process_cell(
    in_process_runs: InProcessRuns,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bonus: the test's own running loop and the pre-fix runner make the runbook's error."""
    from app.utils import asyncio_runner

    monkeypatch.setattr(asyncio_runner, "run_async_safe", prefix_run_async_safe)
    run_id = in_process_runs.create(marketplace_code=marketplace_code)
    run_ingest(run_id)

    row = in_process_runs.store.read(run_id)
    assert row.status == "failed", row
    assert row.error_message == PRE_FIX_ERROR, row
    assert row.finished_at is not None and row.duration_ms is not None, row
    messages = [line.headline for line in in_process_runs.lines()]
    assert FAILED_TEMPLATE.format(run_id=run_id, error=PRE_FIX_ERROR) in messages, messages
    assert in_process_runs.store.count_rows(DOMAIN, marketplace_code=marketplace_code) == 0
