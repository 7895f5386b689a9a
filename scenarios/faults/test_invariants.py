"""The fault invariant itself: it must catch each thing a fault must not leave behind.

``harness.checks.faults.assert_fault_invariants`` is what every fault scenario ends with; a checker
that passes everything would make every scenario green. Here each kind of damage is made by hand in
the fault database, and the checker must name it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from app.maintenance import MESSAGE_PREFIX
from harness.checks.faults import FaultInvariantError, assert_fault_invariants
from harness.core.logs import parse_log
from harness.core.runs import RunStore

pytestmark = pytest.mark.integration

CODE = "mp-invariant"
TRACEBACK_LOG = """\
[2026-11-28 10:00:00] INFO celery.apps.worker: ready.
[2026-11-28 10:00:01] ERROR celery.app.trace: Task failed
Traceback (most recent call last):
  File "/app/x.py", line 1, in run
    boom()
ValueError: boom
[2026-11-28 10:00:02] INFO celery.apps.worker: still here
"""


def _insert_prices(engine: Engine, skus: list[str]) -> None:
    with engine.begin() as conn:
        for sku in skus:
            conn.execute(
                text(
                    "INSERT INTO frontend_prices (project_id, marketplace_code, sku, price, "
                    "currency, observed_at) VALUES (1, :m, :s, 1, 'RUB', now())"
                ),
                {"m": CODE, "s": sku},
            )


def _set(engine: Engine, run_id: int, status: str, error: str | None = None) -> None:
    with engine.begin() as conn:
        conn.execute(
            # A terminal row says when it ended and how long it took (the table insists).
            text(
                "UPDATE ingest_runs SET status = :s, error_message = :e, finished_at = CASE "
                "WHEN :s IN ('success', 'failed') THEN now() END, duration_ms = CASE "
                "WHEN :s IN ('success', 'failed') THEN 0 END WHERE id = :id"
            ),
            {"s": status, "e": error, "id": run_id},
        )


@pytest.fixture
def no_unique_key(fault_engine: Engine) -> Iterator[None]:
    """frontend_prices without its unique key, for the length of one test (then restored)."""
    with fault_engine.begin() as conn:
        name = conn.execute(
            text(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'frontend_prices'::regclass "
                "AND contype = 'u'"
            )
        ).scalar_one()
        conn.execute(text(f'ALTER TABLE frontend_prices DROP CONSTRAINT "{name}"'))
    try:
        yield
    finally:
        with fault_engine.begin() as conn:
            conn.execute(text("TRUNCATE frontend_prices"))
            conn.execute(
                text(
                    f'ALTER TABLE frontend_prices ADD CONSTRAINT "{name}" '
                    "UNIQUE (project_id, marketplace_code, sku)"
                )
            )


def test_a_clean_state_passes_and_an_unlocked_run_counts_as_recovered(
    fault_store: RunStore, fault_engine: Engine
) -> None:
    done = fault_store.create(marketplace_code=CODE)
    _set(fault_engine, done, "success")
    unlocked = fault_store.create(marketplace_code="mp-other")
    _set(fault_engine, unlocked, "failed", f"{MESSAGE_PREFIX}: status was running, ...")
    _insert_prices(fault_engine, ["A", "B"])

    report = assert_fault_invariants(
        fault_store,
        parse_log(TRACEBACK_LOG),
        provoked=[r"ValueError: boom"],
        expected_rows={("frontend_prices", 1, CODE): 2},
    )

    assert report.recovered == [unlocked]
    assert len(report.provoked_tracebacks) == 1


@pytest.mark.parametrize("status", ["queued", "running"])
def test_an_active_run_is_caught(status: str, fault_store: RunStore, fault_engine: Engine) -> None:
    run_id = fault_store.create(marketplace_code=CODE)
    _set(fault_engine, run_id, status)
    with pytest.raises(FaultInvariantError, match=f"run {run_id} is left '{status}'"):
        assert_fault_invariants(fault_store, [], expected_rows={})


@pytest.mark.parametrize(("stored", "expected"), [(1, 2), (3, 2), (2, 0)])
def test_missing_extra_or_unexpected_rows_are_caught(
    stored: int, expected: int, fault_store: RunStore, fault_engine: Engine
) -> None:
    _insert_prices(fault_engine, [f"SKU-{i}" for i in range(stored)])
    with pytest.raises(
        FaultInvariantError,
        match=f"frontend_prices for project 1, marketplace {CODE}: "
        f"{stored} rows, expected {expected}",
    ):
        assert_fault_invariants(
            fault_store, [], expected_rows={("frontend_prices", 1, CODE): expected}
        )


def test_a_duplicate_row_is_caught(
    fault_store: RunStore, fault_engine: Engine, no_unique_key: None
) -> None:
    _insert_prices(fault_engine, ["A", "A"])
    with pytest.raises(
        FaultInvariantError, match=rf"frontend_prices: \(1, '{CODE}', 'A'\) is stored 2 times"
    ):
        assert_fault_invariants(fault_store, [], expected_rows={("frontend_prices", 1, CODE): 2})


def test_an_unprovoked_traceback_is_caught(fault_store: RunStore) -> None:
    with pytest.raises(FaultInvariantError, match=r"unhandled traceback(?s:.*)ValueError: boom"):
        assert_fault_invariants(
            fault_store, parse_log(TRACEBACK_LOG), provoked=[r"KeyError"], expected_rows={}
        )
