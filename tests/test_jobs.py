"""The ingestion jobs end to end: the real marketplace over HTTP, a real Postgres, fresh loops.

Each test runs a job with ``asyncio.run`` as the worker does, then compares the stats and the
domain table to exactly what the marketplace served.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import aclosing
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import uvloop
from sqlalchemy import Engine, create_engine, text

from app.config import Settings
from app.ingest import JobContext, UnknownJobError, execute_ingest_job
from app.ingest.source import (
    MalformedPageError,
    MarketplaceClient,
    SourceError,
    SourceHTTPError,
    SourceProtocolError,
    SourceUnavailableError,
)
from harness.workers.marketplace import MarketplaceServer

DATA = Path(__file__).resolve().parent.parent / "harness" / "data"


@pytest.fixture
def db(clean_db: str) -> Iterator[Engine]:
    engine = create_engine(clean_db)
    yield engine
    engine.dispose()


def make_settings(clean_db: str, url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": clean_db,
        "marketplace_url": url,
        "http_retry_backoff_s": 0.01,
        "http_timeout_s": 5.0,
        **overrides,
    }
    return Settings(**values)


def run_job(
    settings: Settings, code: str, job_code: str = "frontend_prices", *, project_id: int = 7
) -> dict[str, Any]:
    ctx = JobContext(run_id=11, project_id=project_id, marketplace_code=code, job_code=job_code)
    return asyncio.run(execute_ingest_job(ctx, settings))


def price_rows(db: Engine, code: str, project_id: int = 7) -> dict[str, tuple[Any, ...]]:
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT sku, price, currency, discount_price, observed_at FROM frontend_prices "
                "WHERE marketplace_code = :code AND project_id = :project"
            ),
            {"code": code, "project": project_id},
        )
        return {r.sku: tuple(r) for r in rows}


def expected_price_rows(items: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    return {
        i["sku"]: (
            i["sku"],
            Decimal(i["price"]),
            i["currency"],
            None if i["discount_price"] is None else Decimal(i["discount_price"]),
            datetime.fromisoformat(i["observed_at"]),
        )
        for i in items
    }


def stock_rows(db: Engine, code: str) -> dict[tuple[str, str], tuple[Any, ...]]:
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT sku, warehouse, quantity, observed_at FROM stocks "
                "WHERE marketplace_code = :code"
            ),
            {"code": code},
        )
        return {(r.sku, r.warehouse): tuple(r) for r in rows}


def count_rows(db: Engine, table: str) -> int:
    with db.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def stats(
    code: str, domain: str, pages: int, fetched: int, inserted: int, updated: int
) -> dict[str, Any]:
    return {
        "ok": True,
        "project_id": 7,
        "domain": domain,
        "marketplace": code,
        "pages": pages,
        "fetched": fetched,
        "inserted": inserted,
        "updated": updated,
        "run_id": 11,
    }


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- success -----------------------------------------------------------------------------------


def test_frontend_prices_success_stores_exactly_what_was_served(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    result = run_job(make_settings(clean_db, marketplace.url), marketplace_code)

    served = marketplace.expected(marketplace_code, "frontend_prices")
    assert result == stats(marketplace_code, "frontend_prices", 3, 120, 120, 0)
    assert len(served) == 120
    assert price_rows(db, marketplace_code) == expected_price_rows(served)
    assert marketplace.requests(marketplace_code).statuses() == [200, 200, 200]
    # The stats are what ingest_runs.stats_json stores: they must be JSON as they are.
    assert json.loads(json.dumps(result)) == result


def test_stocks_success_stores_exactly_what_was_served(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    result = run_job(make_settings(clean_db, marketplace.url), marketplace_code, "stocks")

    served = marketplace.expected(marketplace_code, "stocks")
    assert result == stats(marketplace_code, "stocks", 3, 150, 150, 0)
    assert stock_rows(db, marketplace_code) == {
        (i["sku"], i["warehouse"]): (
            i["sku"],
            i["warehouse"],
            i["quantity"],
            datetime.fromisoformat(i["observed_at"]),
        )
        for i in served
    }


def test_second_run_updates_every_row_and_duplicates_none(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    settings = make_settings(clean_db, marketplace.url)
    run_job(settings, marketplace_code)
    second = run_job(settings, marketplace_code)

    assert second == stats(marketplace_code, "frontend_prices", 3, 120, 0, 120)
    assert count_rows(db, "frontend_prices") == 120

    # More data the third time: the new rows are inserted, the known ones updated.
    marketplace.configure(marketplace_code, pages=7)
    third = run_job(settings, marketplace_code)
    assert third == stats(marketplace_code, "frontend_prices", 7, 350, 230, 120)
    served = marketplace.expected(marketplace_code, "frontend_prices")
    assert price_rows(db, marketplace_code) == expected_price_rows(served)


def test_a_page_over_postgres_parameter_limit_is_stored_and_counted_exactly(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    # Postgres takes at most 32767 parameters per statement: 5000 rows of 8 bound columns
    # need more, so the upsert must be split (SQLAlchemy's insertmanyvalues batches).
    marketplace.configure(marketplace_code, pages=1, page_size=5000)
    settings = make_settings(clean_db, marketplace.url)
    first = run_job(settings, marketplace_code)
    second = run_job(settings, marketplace_code)

    assert first == stats(marketplace_code, "frontend_prices", 1, 5000, 5000, 0)
    assert second == stats(marketplace_code, "frontend_prices", 1, 5000, 0, 5000)
    served = marketplace.expected(marketplace_code, "frontend_prices")
    assert price_rows(db, marketplace_code) == expected_price_rows(served)


def test_projects_and_marketplaces_do_not_share_rows(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    settings = make_settings(clean_db, marketplace.url)
    run_job(settings, marketplace_code, project_id=7)
    run_job(settings, marketplace_code, project_id=8)
    run_job(settings, marketplace_code + "-b", project_id=7)
    assert count_rows(db, "frontend_prices") == 360


def test_runs_on_uvloop_too(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    ctx = JobContext(11, 7, marketplace_code, "stocks")
    settings = make_settings(clean_db, marketplace.url)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(execute_ingest_job(ctx, settings))
    assert result["inserted"] == 150
    assert count_rows(db, "stocks") == 150


# -- retries and failures ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 500, 429])
def test_a_burst_of_failures_is_retried_then_succeeds(
    clean_db: str,
    db: Engine,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    status: int,
) -> None:
    marketplace.configure(marketplace_code, fail_first=3, fail_status=status)
    result = run_job(make_settings(clean_db, marketplace.url, http_retries=3), marketplace_code)

    assert result == stats(marketplace_code, "frontend_prices", 3, 120, 120, 0)
    assert marketplace.requests(marketplace_code).statuses() == [status] * 3 + [200] * 3
    assert count_rows(db, "frontend_prices") == 120


def test_a_page_failing_once_is_retried(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, fail_pages=[2, 3])
    result = run_job(make_settings(clean_db, marketplace.url), marketplace_code)
    assert result["fetched"] == 120
    assert sorted(marketplace.requests(marketplace_code).statuses()) == [200] * 3 + [500] * 2


def test_a_marketplace_that_keeps_failing_fails_the_job_clearly(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, fail_always=True)
    settings = make_settings(clean_db, marketplace.url, http_retries=3)
    with pytest.raises(SourceUnavailableError) as caught:
        run_job(settings, marketplace_code)

    url = f"{marketplace.url}/api/v1/{marketplace_code}/frontend_prices?page=1"
    assert str(caught.value) == f"marketplace answered 503 for GET {url} on all 4 attempts"
    assert marketplace.requests(marketplace_code).count == 4
    assert count_rows(db, "frontend_prices") == 0


def test_a_failing_page_rolls_back_the_pages_already_stored(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, fail_pages_always=[3])
    with pytest.raises(SourceUnavailableError, match=r"frontend_prices\?page=3 on all 2 attempts"):
        run_job(make_settings(clean_db, marketplace.url, http_retries=1), marketplace_code)
    assert count_rows(db, "frontend_prices") == 0


def test_a_malformed_page_fails_at_once_naming_the_page(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, malformed_pages=[2])
    with pytest.raises(MalformedPageError) as caught:
        run_job(make_settings(clean_db, marketplace.url), marketplace_code)

    url = f"{marketplace.url}/api/v1/{marketplace_code}/frontend_prices?page=2"
    assert str(caught.value).startswith(
        f"page 2 of frontend_prices for {marketplace_code} from {url} is not valid JSON: "
    )
    assert isinstance(caught.value, SourceProtocolError)
    page_2 = [c for c in marketplace.requests(marketplace_code) if c.path.endswith("page=2")]
    assert page_2 == [(f"/api/v1/{marketplace_code}/frontend_prices?page=2", 200)]  # no retry
    assert count_rows(db, "frontend_prices") == 0


def test_an_empty_page_is_no_error(
    clean_db: str, db: Engine, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, empty_pages=[2])
    result = run_job(make_settings(clean_db, marketplace.url), marketplace_code, "stocks")

    assert result == stats(marketplace_code, "stocks", 3, 100, 100, 0)
    served = marketplace.expected(marketplace_code, "stocks")
    assert set(stock_rows(db, marketplace_code)) == {(i["sku"], i["warehouse"]) for i in served}


def test_a_closed_port_fails_clearly_after_the_retries(
    clean_db: str, marketplace_code: str
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(SourceUnavailableError) as caught:
        run_job(make_settings(clean_db, url, http_retries=2), marketplace_code)

    message = str(caught.value)
    assert message.startswith("marketplace could not be reached (ConnectError: ")
    assert f"for GET {url}/api/v1/{marketplace_code}/frontend_prices?page=1 on all 3 attempts" in (
        message
    )
    assert message.endswith(f"(is the marketplace up at APP_MARKETPLACE_URL={url}?)")


def test_a_hanging_marketplace_times_out_clearly(
    clean_db: str, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, hang_s=10.0)
    settings = make_settings(clean_db, marketplace.url, http_timeout_s=0.2, http_retries=1)
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError, match=r"^marketplace did not answer within 0.2 s"):
        run_job(settings, marketplace_code)
    assert time.monotonic() - started < 3


def test_an_invalid_item_names_the_page_the_item_and_the_field(
    clean_db: str, db: Engine, tmp_path: Path, marketplace_code: str
) -> None:
    items = json.loads((DATA / "frontend_prices.json").read_text(encoding="utf-8"))
    items[52]["price"] = "12,50"
    items[53]["currency"] = "rub"
    (tmp_path / "frontend_prices.json").write_text(json.dumps(items), encoding="utf-8")
    shutil.copy(DATA / "stocks.json", tmp_path / "stocks.json")

    with MarketplaceServer(data_dir=tmp_path) as mp, pytest.raises(SourceProtocolError) as caught:
        run_job(make_settings(clean_db, mp.url), marketplace_code)

    url = f"{mp.url}/api/v1/{marketplace_code}/frontend_prices?page=2"
    assert str(caught.value) == (
        f"item 3 (sku {items[52]['sku']!r}) on page 2 of frontend_prices for {marketplace_code} "
        f"from {url} is invalid: field 'price': expected a decimal string like '123.45', "
        "got '12,50'"
    )
    assert count_rows(db, "frontend_prices") == 0


def test_a_key_repeated_on_a_page_is_stored_once(
    clean_db: str, db: Engine, tmp_path: Path, marketplace_code: str
) -> None:
    items = json.loads((DATA / "frontend_prices.json").read_text(encoding="utf-8"))[:3]
    items.append({**items[0], "price": "1.00"})
    (tmp_path / "frontend_prices.json").write_text(json.dumps(items), encoding="utf-8")
    shutil.copy(DATA / "stocks.json", tmp_path / "stocks.json")

    with MarketplaceServer(data_dir=tmp_path) as mp:
        result = run_job(make_settings(clean_db, mp.url), marketplace_code)

    assert (result["fetched"], result["inserted"], result["updated"]) == (4, 3, 0)
    assert price_rows(db, marketplace_code)[items[0]["sku"]][1] == Decimal("1.00")


# -- concurrency -------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 3])
def test_pages_are_fetched_concurrently_within_the_bound(
    clean_db: str,
    db: Engine,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    concurrency: int,
) -> None:
    marketplace.configure(marketplace_code, pages=7, latency_s=0.1)
    settings = make_settings(clean_db, marketplace.url, http_concurrency=concurrency)
    result = run_job(settings, marketplace_code)

    assert result == stats(marketplace_code, "frontend_prices", 7, 350, 350, 0)
    log = marketplace.requests(marketplace_code)
    assert log.count == 7
    # Never more than the bound, and (with 0.1 s per page) really that many at once.
    assert log.max_in_flight == concurrency
    served = marketplace.expected(marketplace_code, "frontend_prices")
    assert price_rows(db, marketplace_code) == expected_price_rows(served)


# -- the client on its own ---------------------------------------------------------------------


def test_stopping_early_cancels_the_fetches_in_flight(
    clean_db: str, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    marketplace.configure(marketplace_code, pages=7, latency_s=0.3)

    async def first_page_only() -> int:
        async with (
            MarketplaceClient(make_settings(clean_db, marketplace.url)) as client,
            aclosing(client.fetch_all("stocks", marketplace_code)) as pages,
        ):
            async for page in pages:
                return page.number
        raise AssertionError("no page")

    started = time.monotonic()
    assert asyncio.run(first_page_only()) == 1
    assert time.monotonic() - started < 1.0


def test_a_page_past_the_end_is_not_retried(
    clean_db: str, marketplace: MarketplaceServer, marketplace_code: str
) -> None:
    async def fetch() -> None:
        async with MarketplaceClient(make_settings(clean_db, marketplace.url)) as client:
            await client.fetch_page("stocks", marketplace_code, 9)

    with pytest.raises(SourceHTTPError, match=r"^marketplace answered 404 for GET .*page=9: ") as e:
        asyncio.run(fetch())
    assert e.value.status_code == 404
    assert marketplace.requests(marketplace_code).count == 1


def test_the_client_must_be_entered(clean_db: str) -> None:
    client = MarketplaceClient(make_settings(clean_db, "http://127.0.0.1:1"))
    with pytest.raises(RuntimeError, match="async with MarketplaceClient"):
        asyncio.run(client.fetch_page("stocks", "x", 1))


def test_a_url_that_is_not_http_is_a_clear_error(clean_db: str) -> None:
    with pytest.raises(SourceError, match="APP_MARKETPLACE_URL must look like http://host:port"):
        run_job(make_settings(clean_db, "ftp://127.0.0.1:1"), "x")


def test_an_unknown_job_code_lists_the_known_ones(clean_db: str) -> None:
    ctx = JobContext(run_id=1, project_id=1, marketplace_code="x", job_code="nope")
    with pytest.raises(UnknownJobError) as caught:
        asyncio.run(execute_ingest_job(ctx, make_settings(clean_db, "http://127.0.0.1:1")))
    assert str(caught.value) == (
        "unknown job_code 'nope'; known job codes: frontend_prices, stocks"
    )
