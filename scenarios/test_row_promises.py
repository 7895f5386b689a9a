"""What the row promises beyond the first run on fresh data.

- error_message is bounded: a marketplace page that quotes a megabyte in the job's error is
  stored at exactly the bound, with the truncation mark, and the log line carries the same.
- A second run over changed data stores the new values: the domain tables checked on fresh
  data only would pass an upsert that kept the old values on conflict.
"""

from __future__ import annotations

import pytest

from app.config import Settings
from harness.checks.assertions import assert_run_succeeded
from harness.core.logs import task_lines
from harness.workers.farm import WorkerRuns
from harness.workers.marketplace import OVERSIZED_LABEL_BYTES, MarketplaceServer
from scenarios.expect import DOMAIN, assert_prices_stored, assert_run_log, assert_shim_lines

pytestmark = pytest.mark.integration

PROJECT_ID = 15
MAX_LEN = Settings.model_fields["error_message_max_len"].default
TRUNCATED = "... [truncated]"


@pytest.mark.parametrize("mode", ["no_loop", "running_loop"])
def test_a_megabyte_error_is_stored_at_the_bound_with_the_mark(
    mode: str,
    pool_runs: WorkerRuns,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    harness_runner: str,
) -> None:
    marketplace.configure(marketplace_code, oversized_pages=[1])
    done = pool_runs.run(mode, marketplace_code=marketplace_code, project_id=PROJECT_ID)
    row, lines = done.row, pool_runs.lines()
    error = row.error_message or ""
    assert row.status == "failed", pool_runs.rows_text()
    assert error.startswith("SourceProtocolError: "), error[:300]
    assert "'marketplace' is 'XXXX" in error, error[:300]
    assert (len(error), error[-len(TRUNCATED) :]) == (MAX_LEN, TRUNCATED), (
        f"error_message is {len(error)} characters ending {error[-40:]!r}; the job's error "
        f"quoted {OVERSIZED_LABEL_BYTES} bytes, the bound is {MAX_LEN} with {TRUNCATED!r}"
    )
    assert_run_log(lines, row.id, mode, runner=harness_runner, outcome="failed", error=error)
    assert_shim_lines(lines, row.id, mode)
    longest = max(len(line.raw) for line in task_lines(lines, row.id))
    assert longest < MAX_LEN + 200, f"a task line of {longest} characters: the log is unbounded"


@pytest.mark.parametrize("mode", ["no_loop", "running_loop"])
def test_a_second_run_over_changed_data_stores_the_new_values(
    mode: str,
    pool_runs: WorkerRuns,
    marketplace: MarketplaceServer,
    marketplace_code: str,
    harness_runner: str,
) -> None:
    first = pool_runs.run(mode, marketplace_code=marketplace_code, project_id=PROJECT_ID)
    served_first = marketplace.expected(marketplace_code, DOMAIN)
    assert_prices_stored(
        pool_runs.store,
        project_id=PROJECT_ID,
        marketplace_code=marketplace_code,
        served=served_first,
    )

    marketplace.configure(marketplace_code, revision=1)  # every price moves, the keys stay
    served = marketplace.expected(marketplace_code, DOMAIN)
    assert [i["sku"] for i in served] == [i["sku"] for i in served_first]
    assert all(a["price"] != b["price"] for a, b in zip(served, served_first, strict=True))
    second = pool_runs.run(mode, marketplace_code=marketplace_code, project_id=PROJECT_ID)

    lines = pool_runs.lines()
    assert_run_succeeded(
        second.row,
        log=lines,
        project_id=PROJECT_ID,
        **marketplace.served_stats(marketplace_code, DOMAIN),
    )
    counts = [
        (r.row.stats_json or {}).get(k) for r in (first, second) for k in ("inserted", "updated")
    ]
    assert counts == [len(served), 0, 0, len(served)], (
        f"inserted/updated of the first and the second run: {counts}; every item of the second "
        "is an update of a row the first stored"
    )
    for run in (first, second):
        assert_run_log(lines, run.run_id, mode, runner=harness_runner)
        assert_shim_lines(lines, run.run_id, mode)
    assert_prices_stored(
        pool_runs.store, project_id=PROJECT_ID, marketplace_code=marketplace_code, served=served
    )
