"""Load: 50 runs across several projects on one worker, in running_loop mode, all correct.

Per pool (prefork with 2 children, threads with 4), a stack of its own whose worker's default
loop mode is ``running_loop``: the 50 runs are started through the API, as the UI starts them,
so the messages carry no loop-mode header and every task body runs inside a running loop. Every
run must succeed with exact stats, log the running-loop runner line, and leave the domain tables
exactly as the marketplace served them; the pool's slots must really have run side by side.

The 50 keys are 5 projects x 5 marketplace codes x both jobs, each started once: the
one-active-run index never refuses one, and a fresh key means every row is an insert.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import pytest

from harness.checks.assertions import assert_loop_log, assert_run_succeeded
from harness.core.runs import RunRow
from harness.services import Services
from scenarios.faults._stack import (
    api_client,
    assert_domain_stored,
    assert_stack_invariant,
    own_stack,
    wait_all_terminal,
)

if TYPE_CHECKING:
    from harness.workers.stack import FullStack

from scenarios.expect import DEFAULT_MODE_SOURCE, assert_shim_lines

pytestmark = pytest.mark.integration

LOOP_MODE: Final = "running_loop"
PROJECTS: Final = (201, 202, 203, 204, 205)
JOBS: Final = ("frontend_prices", "stocks")
# Code i serves i+1 pages of 50 items (fixture data, then synthesized): runs of different sizes.
CODES: Final = tuple((f"load-{i}", i + 1) for i in range(5))
RUNS: Final = len(PROJECTS) * len(CODES) * len(JOBS)
# A little network time per page: runs overlap in the pool, as under real traffic, even on a
# machine fast enough to finish a run before the next POST arrives.
LATENCY_S: Final = 0.02
TERMINAL_TIMEOUT_S: Final = 60.0


@pytest.fixture(
    params=[
        pytest.param(("prefork", 2), id="prefork-c2"),
        pytest.param(("threads", 4), id="threads-c4"),
    ]
)
def load_stack(
    request: pytest.FixtureRequest, services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FullStack]:
    pool, concurrency = request.param
    with own_stack(
        services,
        tmp_path_factory.mktemp(f"load-{pool}"),
        name=f"load_{pool}",
        pool=pool,
        concurrency=concurrency,
        loop_mode=LOOP_MODE,
    ) as stack:
        for code, pages in CODES:
            stack.marketplace.configure(code, pages=pages, latency_s=LATENCY_S)
        yield stack


def _keys() -> list[tuple[int, str, str]]:
    """(project, code, job) for every run; the project changes from one start to the next."""
    return [(project, code, job) for job in JOBS for code, _ in CODES for project in PROJECTS]


def _max_overlap(rows: Sequence[RunRow]) -> int:
    """The most runs that were executing at the same moment (from started_at / finished_at)."""
    events: list[tuple[datetime, int]] = []
    for row in rows:
        assert row.started_at is not None and row.finished_at is not None
        events.append((row.started_at, 1))
        events.append((row.finished_at, -1))
    # At equal times the end sorts first: a run that ends as the next begins did not overlap it.
    events.sort(key=lambda event: (event[0], event[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_fifty_runs_in_running_loop_mode_all_correct(
    load_stack: FullStack, record_property: Any
) -> None:
    stack = load_stack
    started = time.monotonic()
    runs: dict[int, tuple[int, str, str]] = {}
    with api_client(stack) as client:
        for project, code, job in _keys():
            response = client.post(
                f"/api/v1/projects/{project}/ingest/runs",
                json={"job_code": job, "marketplace_code": code},
            )
            assert response.status_code == 202, (
                f"starting {job} on {code} for project {project}: "
                f"{response.status_code} {response.text}"
            )
            runs[int(response.json()["id"])] = (project, code, job)
    assert len(runs) == RUNS
    rows = wait_all_terminal(
        stack.store, list(runs), timeout=TERMINAL_TIMEOUT_S, worker=stack.worker
    )
    elapsed = time.monotonic() - started
    record_property("load_seconds", round(elapsed, 2))

    lines = stack.worker.log_lines()  # wait_all_terminal waited for each run's last line
    for run_id, (project, code, job) in sorted(runs.items()):
        row = rows[run_id]
        served = stack.marketplace.expected(code, job)
        assert_run_succeeded(
            row,
            log=lines,
            project_id=project,
            **stack.marketplace.served_stats(code, job),
        )
        # Each key is new: every row is an insert (an update would mean a run wrote another's).
        stats = row.stats_json or {}
        assert (stats.get("inserted"), stats.get("updated")) == (len(served), 0), (
            f"run {run_id} ({job} on {code}, project {project}): stats {stats}, expected "
            f"{len(served)} inserted and 0 updated"
        )
        assert_loop_log(lines, run_id, LOOP_MODE, job_code=job)
        assert_shim_lines(lines, run_id, LOOP_MODE, source=DEFAULT_MODE_SOURCE)
        assert_domain_stored(
            stack.store, job, project_id=project, marketplace_code=code, served=served
        )
    peak = _max_overlap(list(rows.values()))
    record_property("max_overlap", peak)
    assert 2 <= peak <= stack.concurrency, (
        f"at the peak {peak} runs executed at once on {stack.pool} -c {stack.concurrency}; "
        f"expected at least 2 (the pool's slots side by side) and at most {stack.concurrency}"
    )
    assert stack.worker.is_alive(), f"the worker exited (code {stack.worker.returncode})"
    assert_stack_invariant(stack, runs.values())
