"""Fixtures for the automated runbook: one ``FullStack`` per loop mode, a browser, a page.

A stack reuses the session's Postgres and Redis (the harness's ``services`` fixture) with a
database of its own, so its run ids start at 1 and no other test's ``TRUNCATE`` reaches it; the
tests of one mode share it (module scope, parametrized with ``scope="module"``), so each mode
pays for one worker start, not one per test.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harness.pytest.plugin import harness_config_key
from harness.services import Services

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

    from harness.workers.stack import FullStack

MODE_PARAM = "runbook_mode"
# Big enough for the table with two runs and their stats in one screenshot.
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # --loop-mode (or HARNESS_LOOP_MODE) selects the runbook's modes as it selects the matrix's.
    selected = set(config.stash[harness_config_key].loop_modes)
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        mode = callspec.params.get(MODE_PARAM) if callspec is not None else None
        (dropped if mode is not None and mode not in selected else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="module")
def runbook_stack(
    runbook_mode: str, services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FullStack]:
    """The whole stack, its worker in ``runbook_mode``, on the session's servers."""
    # Lazy: FastAPI, Alembic and the rest of the stack would add to every pytest process's start.
    from harness.workers.stack import FullStack

    database = f"runbook_{runbook_mode}_{secrets.token_hex(4)}"
    with FullStack(
        services=services,
        database=database,
        loop_mode=runbook_mode,
        log_dir=tmp_path_factory.mktemp(f"runbook-{runbook_mode}"),
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Lazy: Playwright would add to every pytest process's (and xdist worker's) start.
    from playwright.sync_api import sync_playwright

    from harness.workers.browser import launch_chromium

    # No skip when chromium is missing: launch_chromium fails, saying how to install it.
    with sync_playwright() as playwright:
        launched = launch_chromium(playwright)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(10_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="session")
def reports_dir(request: pytest.FixtureRequest) -> Path:
    """``reports/`` at the project root (gitignored): where the screenshots go."""
    path = request.config.rootpath / "reports"
    path.mkdir(parents=True, exist_ok=True)
    return path
