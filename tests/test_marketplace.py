"""The marketplace source over real HTTP: pages, every knob, the control API, and expected()."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.workers.marketplace import (
    DOMAINS,
    OVERSIZED_LABEL_BYTES,
    Knobs,
    Marketplace,
    MarketplaceServer,
    ServedRequest,
)
from tests._children import sigint_as_in_a_terminal

DATA = Path(__file__).resolve().parent.parent / "harness" / "data"


@pytest.fixture
def http(marketplace: MarketplaceServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=marketplace.url, timeout=10) as client:
        yield client


def get_page(http: httpx.Client, code: str, domain: str, page: int) -> httpx.Response:
    return http.get(f"/api/v1/{code}/{domain}", params={"page": page})


def all_items(http: httpx.Client, code: str, domain: str) -> list[dict[str, Any]]:
    first = get_page(http, code, domain, 1).json()
    items = list(first["items"])
    for n in range(2, first["pages"] + 1):
        items.extend(get_page(http, code, domain, n).json()["items"])
    return items


# -- the data ----------------------------------------------------------------------------------


def test_fixture_data_is_small_deterministic_and_keyed_uniquely() -> None:
    prices = json.loads((DATA / "frontend_prices.json").read_text(encoding="utf-8"))
    stocks = json.loads((DATA / "stocks.json").read_text(encoding="utf-8"))
    assert sum(p.stat().st_size for p in DATA.glob("*.json")) < 100_000
    assert len(prices) == 120
    assert len(stocks) == 150
    assert len({p["sku"] for p in prices}) == len(prices)
    assert len({(s["sku"], s["warehouse"]) for s in stocks}) == len(stocks)
    assert all(isinstance(p["price"], str) and p["observed_at"].endswith("Z") for p in prices)
    assert all(isinstance(s["quantity"], int) for s in stocks)


# -- pages -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("domain", "total"), [("frontend_prices", 120), ("stocks", 150)])
def test_pages_are_one_based_and_cover_the_data(
    marketplace: MarketplaceServer,
    http: httpx.Client,
    marketplace_code: str,
    domain: str,
    total: int,
) -> None:
    response = get_page(http, marketplace_code, domain, 1)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert {k: body[k] for k in ("marketplace", "domain", "page", "pages")} == {
        "marketplace": marketplace_code,
        "domain": domain,
        "page": 1,
        "pages": 3,
    }
    assert len(body["items"]) == 50
    items = all_items(http, marketplace_code, domain)
    assert len(items) == total
    assert items == marketplace.expected(marketplace_code, domain)
    assert marketplace.expected_pages(marketplace_code, domain) == 3


def test_items_have_the_documented_shape(http: httpx.Client, marketplace_code: str) -> None:
    price = get_page(http, marketplace_code, "frontend_prices", 1).json()["items"][0]
    assert set(price) == {"sku", "price", "currency", "discount_price", "observed_at"}
    assert price["currency"] == "RUB"
    stock = get_page(http, marketplace_code, "stocks", 1).json()["items"][0]
    assert set(stock) == {"sku", "warehouse", "quantity", "observed_at"}


def test_past_the_end_unknown_domain_and_bad_page_are_json_errors(
    http: httpx.Client, marketplace_code: str
) -> None:
    past = get_page(http, marketplace_code, "stocks", 4)
    assert past.status_code == 404
    assert past.json() == {
        "error": f"page 4 is past the end: stocks for {marketplace_code} has 3 pages",
        "status": 404,
    }
    unknown = get_page(http, marketplace_code, "returns", 1)
    assert unknown.status_code == 404
    assert "known domains: frontend_prices, stocks" in unknown.json()["error"]
    assert get_page(http, marketplace_code, "stocks", 0).status_code == 400
    assert http.get(f"/api/v1/{marketplace_code}/stocks?page=two").status_code == 400
    assert http.get(f"/api/v1/{marketplace_code}/stocks?page=%C2%B2").status_code == 400
    assert http.get(f"/api/v1/{marketplace_code}/stocks").json()["page"] == 1
    assert http.get("/nowhere").status_code == 404


def test_codes_with_reserved_characters_are_served(http: httpx.Client) -> None:
    response = http.get("/api/v1/ozon%2Fru%20x/stocks", params={"page": 1})
    assert response.json()["marketplace"] == "ozon/ru x"


# -- knobs -------------------------------------------------------------------------------------


def test_page_size_and_pages_knobs(
    marketplace: MarketplaceServer, http: httpx.Client, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, page_size=7)
    assert marketplace.expected_pages(marketplace_code, "frontend_prices") == 18  # ceil(120/7)
    assert len(get_page(http, marketplace_code, "frontend_prices", 18).json()["items"]) == 1

    marketplace.configure(marketplace_code, page_size=50, pages=7)
    items = all_items(http, marketplace_code, "stocks")
    assert len(items) == 350
    assert len({(i["sku"], i["warehouse"]) for i in items}) == 350
    assert get_page(http, marketplace_code, "stocks", 8).status_code == 404
    assert items == marketplace.expected(marketplace_code, "stocks")
    # Deterministic: another code with the same knobs gets the very same items.
    marketplace.configure("other", pages=7)
    assert marketplace.expected("other", "stocks") == items

    marketplace.configure(marketplace_code, pages=1)
    assert len(all_items(http, marketplace_code, "frontend_prices")) == 50
    marketplace.configure(marketplace_code, pages=None)
    assert marketplace.expected_pages(marketplace_code, "frontend_prices") == 3


def test_fail_first_counts_from_when_it_was_set(
    marketplace: MarketplaceServer, http: httpx.Client, marketplace_code: str
) -> None:
    assert get_page(http, marketplace_code, "stocks", 1).status_code == 200
    marketplace.configure(marketplace_code, fail_first=2)
    statuses = [get_page(http, marketplace_code, "stocks", 1).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert marketplace.requests(marketplace_code).statuses() == [200, 503, 503, 200]


def test_fail_always_with_a_chosen_status(
    marketplace: MarketplaceServer, http: httpx.Client, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, fail_always=True)
    assert [get_page(http, marketplace_code, "stocks", n).status_code for n in (1, 2, 9)] == [
        503,
        503,
        503,
    ]
    marketplace.configure(marketplace_code, fail_status=429)
    assert get_page(http, marketplace_code, "frontend_prices", 1).status_code == 429
    marketplace.configure(marketplace_code, fail_always=False)
    assert get_page(http, marketplace_code, "frontend_prices", 1).status_code == 200


def test_fail_pages_fail_once_per_domain_and_fail_pages_always_keep_failing(
    marketplace: MarketplaceServer, http: httpx.Client, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, fail_pages=[2], fail_pages_always=[3])
    got = [
        get_page(http, marketplace_code, domain, page).status_code
        for domain in DOMAINS
        for page in (1, 2, 2, 3, 3)
    ]
    assert got == [200, 500, 200, 500, 500] * 2
    # fail_pages pages arrive on retry; fail_pages_always pages never do.
    assert len(marketplace.expected(marketplace_code, "stocks")) == 100
    marketplace.configure(marketplace_code, fail_pages=[2])  # re-arming fails them once more
    assert get_page(http, marketplace_code, "stocks", 2).status_code == 500


def test_malformed_and_empty_pages(
    marketplace: MarketplaceServer, http: httpx.Client, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, malformed_pages=[2], empty_pages=[3])
    malformed = get_page(http, marketplace_code, "frontend_prices", 2)
    assert malformed.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(malformed.content)
    empty = get_page(http, marketplace_code, "frontend_prices", 3).json()
    assert empty["items"] == []
    assert empty["pages"] == 3
    expected = marketplace.expected(marketplace_code, "frontend_prices")
    assert expected == get_page(http, marketplace_code, "frontend_prices", 1).json()["items"]
    assert marketplace.expected_pages(marketplace_code, "frontend_prices") == 3


def test_oversized_pages_quote_a_megabyte_and_serve_nothing(
    marketplace: MarketplaceServer, http: httpx.Client, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, oversized_pages=[1])
    page = get_page(http, marketplace_code, "frontend_prices", 1).json()
    assert page["marketplace"] == "X" * OVERSIZED_LABEL_BYTES
    assert page["items"]  # a whole page, only mislabelled
    assert len(marketplace.expected(marketplace_code, "frontend_prices")) == 120 - 50


def test_a_revision_moves_every_value_and_keeps_every_key(
    marketplace: MarketplaceServer, http: httpx.Client, marketplace_code: str
) -> None:
    before = {d: marketplace.expected(marketplace_code, d) for d in ("frontend_prices", "stocks")}
    marketplace.configure(marketplace_code, revision=2)
    prices = get_page(http, marketplace_code, "frontend_prices", 1).json()["items"]
    assert prices == marketplace.expected(marketplace_code, "frontend_prices")[:50]
    first, old = prices[0], before["frontend_prices"][0]
    assert first["sku"] == old["sku"] and first["currency"] == old["currency"]
    assert Decimal(first["price"]) == Decimal(old["price"]) + 2
    assert first["observed_at"][:13] != old["observed_at"][:13]
    stocks = marketplace.expected(marketplace_code, "stocks")
    assert [(i["sku"], i["warehouse"]) for i in stocks] == [
        (i["sku"], i["warehouse"]) for i in before["stocks"]
    ]
    assert [i["quantity"] for i in stocks] == [i["quantity"] + 2 for i in before["stocks"]]
    with pytest.raises(ValueError, match="knob 'revision' takes an integer >= 0, got -1"):
        marketplace.configure(marketplace_code, revision=-1)


def test_latency_and_hang_delay_the_answer(
    marketplace: MarketplaceServer, http: httpx.Client, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, latency_s=0.1)
    started = time.monotonic()
    assert get_page(http, marketplace_code, "stocks", 1).status_code == 200
    assert time.monotonic() - started >= 0.1

    marketplace.configure(marketplace_code, latency_s=0.0, hang_s=5.0)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        http.get(f"/api/v1/{marketplace_code}/stocks", params={"page": 1}, timeout=0.2)
    assert time.monotonic() - started < 2


def test_stopping_wakes_requests_that_hang() -> None:
    with MarketplaceServer(hang_s=30.0) as mp:
        results: list[BaseException | int] = []

        def call() -> None:
            try:
                results.append(
                    httpx.get(f"{mp.url}/api/v1/x/stocks?page=1", timeout=10).status_code
                )
            except httpx.HTTPError as exc:
                results.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 5
        while mp.requests("x").count == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
    caller.join(timeout=5)
    assert time.monotonic() - started < 2
    assert not caller.is_alive()
    assert len(results) == 1


def test_knobs_are_per_code_over_server_wide_defaults(
    marketplace: MarketplaceServer, http: httpx.Client, marketplace_code: str
) -> None:
    marketplace.configure_defaults(page_size=10)
    marketplace.configure(marketplace_code, page_size=25, fail_first=1)
    assert marketplace.knobs("someone-else").page_size == 10
    assert marketplace.knobs(marketplace_code).page_size == 25
    assert get_page(http, "someone-else", "stocks", 1).status_code == 200
    assert marketplace.expected_pages("someone-else", "stocks") == 15
    assert get_page(http, marketplace_code, "stocks", 1).status_code == 503

    marketplace.reset(marketplace_code)
    assert marketplace.knobs(marketplace_code).page_size == 10
    assert marketplace.requests(marketplace_code).count == 0
    assert marketplace.requests("someone-else").count == 1

    marketplace.reset()
    assert marketplace.knobs("someone-else") == Knobs()
    assert marketplace.requests("someone-else").count == 0


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"latency": 1}, "unknown knob 'latency'; known knobs: latency_s, hang_s, fail_first"),
        ({"page_size": 0}, "knob 'page_size' takes an integer >= 1, got 0"),
        ({"fail_pages": [0]}, "knob 'fail_pages' takes page numbers >= 1"),
        ({"fail_pages": "2"}, "knob 'fail_pages' takes a list of page numbers"),
        ({"fail_always": 1}, "knob 'fail_always' takes true or false"),
        ({"fail_status": 200}, "knob 'fail_status' takes an HTTP error status"),
        ({"latency_s": -1}, "knob 'latency_s' takes seconds >= 0"),
        ({"pages": 100_000_000}, "pages * page_size = 5000000000 items is more than"),
    ],
)
def test_bad_knobs_are_refused_and_change_nothing(
    marketplace: MarketplaceServer, knobs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        marketplace.configure("c", fail_first=3, **knobs)
    assert marketplace.knobs("c") == Knobs()


# -- control API -------------------------------------------------------------------------------


def test_control_api_sets_reads_and_resets_knobs(
    marketplace: MarketplaceServer, http: httpx.Client, marketplace_code: str
) -> None:
    answer = http.post(f"/_control/{marketplace_code}", json={"fail_first": 1, "empty_pages": [2]})
    assert answer.status_code == 200
    assert answer.json()["knobs"]["empty_pages"] == [2]
    assert marketplace.knobs(marketplace_code).fail_first == 1
    assert get_page(http, marketplace_code, "stocks", 1).status_code == 503

    described = http.get(f"/_control/{marketplace_code}").json()
    assert described["knobs"]["fail_first"] == 1
    assert described["requests"]["count"] == 1
    assert described["requests"]["calls"] == [[f"/api/v1/{marketplace_code}/stocks?page=1", 503]]
    assert described["pages"] == {"frontend_prices": 3, "stocks": 3}

    assert http.post("/_control", json={"page_size": 30}).json()["knobs"]["page_size"] == 30
    assert marketplace.expected_pages("anyone", "frontend_prices") == 4

    assert http.delete(f"/_control/{marketplace_code}").status_code == 200
    assert marketplace.knobs(marketplace_code).fail_first == 0
    assert marketplace.knobs(marketplace_code).page_size == 30
    assert http.delete("/_control").status_code == 200
    assert marketplace.knobs(marketplace_code) == Knobs()


def test_control_api_refuses_bad_bodies(http: httpx.Client, marketplace_code: str) -> None:
    bad_knob = http.post(f"/_control/{marketplace_code}", json={"nope": 1})
    assert bad_knob.status_code == 400
    assert "known knobs: latency_s" in bad_knob.json()["error"]
    not_json = http.post(f"/_control/{marketplace_code}", content=b"{oops")
    assert not_json.status_code == 400
    assert http.post(f"/_control/{marketplace_code}", json=[1]).status_code == 400
    assert http.get("/_control").status_code == 405
    assert http.get("/_health").json() == {"ok": True}


# -- observability -----------------------------------------------------------------------------


def test_request_log_counts_and_measures_concurrency(
    marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    # Long enough that the three requests overlap even when a busy machine starts their
    # threads far apart (0.2 s did not, once, under the stress hog).
    marketplace.configure(marketplace_code, latency_s=1.5)
    barrier = threading.Barrier(3)

    def call(page: int) -> None:
        barrier.wait()
        httpx.get(f"{marketplace.url}/api/v1/{marketplace_code}/stocks?page={page}", timeout=10)

    callers = [threading.Thread(target=call, args=(n,)) for n in (1, 2, 3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=10)

    log = marketplace.requests(marketplace_code)
    assert log.count == len(log) == 3
    assert log.max_in_flight == 3
    assert sorted(log) == [(f"/api/v1/{marketplace_code}/stocks?page={n}", 200) for n in (1, 2, 3)]
    assert all(isinstance(c, ServedRequest) for c in log.calls)
    assert marketplace.requests("never-asked").count == 0


# -- lifecycle ---------------------------------------------------------------------------------


def test_starts_fast_on_a_free_port_and_stops() -> None:
    started = time.perf_counter()
    with MarketplaceServer() as mp:
        elapsed = time.perf_counter() - started
        url = mp.url
        assert httpx.get(f"{url}/_health").status_code == 200
    assert elapsed < 0.1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/_health")


def test_a_busy_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            OSError, match=f"could not listen on 127.0.0.1:{port}.*0 for a free one"
        ):
            MarketplaceServer(port=port).start()


def test_custom_data_dir(tmp_path: Path) -> None:
    (tmp_path / "frontend_prices.json").write_text('[{"sku": "A"}]', encoding="utf-8")
    (tmp_path / "stocks.json").write_text("[]", encoding="utf-8")
    mp = Marketplace(tmp_path)
    assert mp.expected("c", "frontend_prices") == [{"sku": "A"}]
    assert mp.expected("c", "stocks") == []
    assert mp.expected_pages("c", "stocks") == 1  # page 1 always exists


def test_runs_standalone_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.workers.marketplace", "--port", "0", "--page-size", "100"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("marketplace listening on http://127.0.0.1:")
        url = line.split()[3]
        body = httpx.get(f"{url}/api/v1/demo/stocks?page=1", timeout=5).json()
        assert body["pages"] == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
