"""7. Marketplace faults: slow pages, bursts of 5xx, malformed JSON, empty pages, a hang.

Each is retried where a retry can help (a 5xx, a 429, a timeout) and otherwise ends the run
``failed`` with an error naming what went wrong and where; a fault the client absorbs (slow or
empty pages, a burst shorter than the retries) ends in ``success`` with exactly what was served.
Whatever happened, the worker never crashes: after each case it answers a ping and runs a normal
run to success. One solo worker serves the module, with the client's limits made short
(``APP_HTTP_TIMEOUT_S=0.5``, two retries 10 and 20 ms apart) so a hang fails in ~1.5 s.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import pytest

from harness.checks.assertions import assert_run_failed, assert_run_succeeded
from harness.checks.faults import (
    FaultWorkers,
    RowsKey,
    assert_fault_invariants,
    served_rows,
    wait_answers_ping,
)
from harness.core.runs import RunStore
from harness.pytest.plugin import add_failure_detail
from harness.services import Services
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess

pytestmark = pytest.mark.integration

PROJECT_ID: Final = 17
DOMAIN: Final = "frontend_prices"
TIMEOUT_S: Final = 0.5
ATTEMPTS: Final = 3  # APP_HTTP_RETRIES=2
PAGES: Final = 3
PAGE_SIZE: Final = 50
# The message of a URL in an error: the client names the exact request that failed.
URL: Final = r"http://127\.0\.0\.1:\d+/api/v1/{code}/frontend_prices\?page={page}"


@dataclass(frozen=True)
class Case:
    """One marketplace fault: its knobs, and how the run must end."""

    knobs: Mapping[str, Any]
    error: str | None = None  # a regex over error_message (with {code}, {url}); None: success
    # Requests per page the client must have made: retried (ATTEMPTS) or not (1).
    requests: Mapping[int, int] = field(default_factory=dict)
    # Requests the client started, answered or not (a hung one is logged when it ends).
    started: int | None = None
    fewer_items: bool = False


CASES: Final = {
    "slow_pages": Case({"latency_s": 0.1, "pages": PAGES}),
    "5xx_burst": Case(
        {"fail_first": 2, "fail_pages": [2, 3], "pages": PAGES},
        requests={1: ATTEMPTS, 2: 2, 3: 2},
    ),
    "429_burst": Case(
        {"fail_first": 2, "fail_status": 429, "pages": PAGES}, requests={1: ATTEMPTS}
    ),
    "always_5xx": Case(
        {"fail_always": True},
        error=rf"^SourceUnavailableError: marketplace answered 503 for GET {{url}} "
        rf"on all {ATTEMPTS} attempts$",
        requests={1: ATTEMPTS},
    ),
    "malformed_json": Case(
        {"malformed_pages": [2], "pages": PAGES},
        error=r"^MalformedPageError: page 2 of frontend_prices for {code} from {url} "
        r"is not valid JSON: ",
        requests={2: 1},  # not retried: the same bytes would come back
    ),
    "empty_pages": Case({"empty_pages": [2], "pages": PAGES}, fewer_items=True),
    "hang_past_timeout": Case(
        {"hang_s": 1.0},
        error=rf"^SourceUnavailableError: marketplace did not answer within {TIMEOUT_S:g} s "
        rf"\(ReadTimeout\) for GET {{url}} on all {ATTEMPTS} attempts",
        started=ATTEMPTS,
    ),
}


@pytest.fixture(scope="module")
def module_workers(
    services: Services,
    fault_database_url: str,
    marketplace_server: MarketplaceServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FaultWorkers]:
    with FaultWorkers(
        database_url=fault_database_url,
        broker_url=services.redis_url,
        marketplace_url=marketplace_server.url,
        log_dir=tmp_path_factory.mktemp("marketplace-faults"),
    ) as workers:
        workers.start(
            APP_HTTP_TIMEOUT_S=str(TIMEOUT_S),
            APP_HTTP_RETRIES=str(ATTEMPTS - 1),
            APP_HTTP_CONCURRENCY="4",  # the service's default: pages fetched side by side
        )
        yield workers


@pytest.fixture
def worker(
    request: pytest.FixtureRequest, module_workers: FaultWorkers, fault_db: str
) -> Iterator[CeleryWorkerProcess]:
    del fault_db  # emptied for this test
    marks = module_workers.marks()
    add_failure_detail(request.node, lambda: ("worker log", module_workers.log_text(marks)))
    yield module_workers.workers[0]


def _requests_per_page(marketplace: MarketplaceServer, code: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for call in marketplace.requests(code):
        page = int(re.search(r"[?&]page=(\d+)", call.path).group(1))  # type: ignore[union-attr]
        counts[page] = counts.get(page, 0) + 1
    return counts


@pytest.mark.parametrize("name", list(CASES))
def test_marketplace_fault(
    name: str,
    worker: CeleryWorkerProcess,
    fault_store: RunStore,
    marketplace: MarketplaceServer,
) -> None:
    case = CASES[name]
    since = worker.log_mark()
    code = f"mp-{name.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    marketplace.configure(code, **case.knobs)
    run_id = fault_store.create(project_id=PROJECT_ID, marketplace_code=code)
    worker.send(run_id, loop_mode="no_loop")

    row = fault_store.wait_terminal(run_id, timeout=15.0)

    lines = worker.log_lines(since)
    expected: dict[RowsKey, int] = {}
    if case.error is None:
        served = marketplace.expected(code, DOMAIN)
        assert_run_succeeded(
            row,
            log=lines,
            project_id=PROJECT_ID,
            **marketplace.served_stats(code, DOMAIN),
        )
        if case.fewer_items:
            assert len(served) < PAGES * PAGE_SIZE, "the empty page was not empty"
        expected.update(served_rows(marketplace, code, project_id=PROJECT_ID))
    else:
        failed_page = 2 if "malformed" in name else 1
        url = URL.format(code=re.escape(code), page=failed_page)
        assert_run_failed(
            row, error=re.compile(case.error.format(code=re.escape(code), url=url)), log=lines
        )
        assert row.stats_json is None
    per_page = _requests_per_page(marketplace, code)
    for page, count in case.requests.items():
        assert per_page.get(page) == count, (
            f"page {page} was requested {per_page.get(page, 0)} times, expected {count} "
            f"(all requests: {list(marketplace.requests(code))})"
        )

    if case.started is not None:
        assert marketplace.requests(code).count == case.started

    # Whatever the source did, the worker is fine: it answers and runs a normal run.
    wait_answers_ping(worker)
    normal_code = f"mp-normal-{uuid.uuid4().hex[:6]}"
    normal = fault_store.create(project_id=PROJECT_ID, marketplace_code=normal_code)
    worker.send(normal, loop_mode="no_loop")
    served = marketplace.expected(normal_code, DOMAIN)
    assert_run_succeeded(
        fault_store.wait_terminal(normal),
        log=worker.log_lines(since),
        project_id=PROJECT_ID,
        **marketplace.served_stats(normal_code, DOMAIN),
    )
    expected.update(served_rows(marketplace, normal_code, project_id=PROJECT_ID))
    assert_fault_invariants(fault_store, worker.log_lines(since), expected_rows=expected)
