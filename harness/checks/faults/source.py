"""The marketplace as a valve: hold a run's source so the run is reliably mid-flight, release
it, and read what the source served (the rows a successful run must have stored)."""

from __future__ import annotations

import uuid
from typing import Any

from harness.checks.faults._settings import _HELD_PAGE_SIZE, _HELD_PAGES, HELD_LATENCY_S, RowsKey
from harness.checks.faults.waits import wait_mid_run
from harness.core.runs import RunStore
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess

__all__ = ["hold_source", "release_source", "served_rows", "start_held_run"]


def hold_source(
    marketplace: MarketplaceServer, code: str, *, latency_s: float = HELD_LATENCY_S
) -> None:
    """Make ``code``'s marketplace slow and long, so a run on it stays mid-run until released.

    Every request waits ``latency_s``; there are 40 pages of 5 items, fetched one at a time by
    a fault worker, so the run cannot end on its own within any test (10 s). The data stays the
    same after :func:`release_source`.
    """
    marketplace.configure(code, latency_s=latency_s, pages=_HELD_PAGES, page_size=_HELD_PAGE_SIZE)


def start_held_run(
    store: RunStore,
    worker: CeleryWorkerProcess,
    marketplace: MarketplaceServer,
    *,
    project_id: int,
    loop_mode: str = "no_loop",
    **send_options: Any,
) -> tuple[int, str]:
    """Create a run on a fresh, held marketplace code, send it to ``worker`` and return
    (run id, code) once it is mid-run (:func:`wait_mid_run`): the moment to provoke a fault.

    ``send_options`` go to ``worker.send`` (``soft_time_limit=...``).
    """
    code = f"mp-{uuid.uuid4().hex[:8]}"
    hold_source(marketplace, code)
    run_id = store.create(project_id=project_id, marketplace_code=code)
    worker.send(run_id, loop_mode=loop_mode, **send_options)
    wait_mid_run(store, run_id, marketplace=marketplace, code=code, worker=worker)
    return run_id, code


def release_source(marketplace: MarketplaceServer, code: str) -> None:
    """Let a held run finish: its next requests are answered at once."""
    marketplace.configure(code, latency_s=0.0)


def served_rows(
    marketplace: MarketplaceServer,
    code: str,
    *,
    project_id: int,
    domain: str = "frontend_prices",
) -> dict[RowsKey, int]:
    """The domain rows a successful run of ``code`` leaves: one per item the source serves."""
    items = marketplace.expected(code, domain)
    if domain == "frontend_prices":
        count = len({item["sku"] for item in items})
    else:
        count = len({(item["sku"], item["warehouse"]) for item in items})
    return {(domain, project_id, code): count}
