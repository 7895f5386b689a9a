"""Two starts of the same project, marketplace and job at the same instant: exactly one run.

Through the real API (uvicorn, FastAPI's threadpool), with the real worker and broker: each
round releases two POSTs for one key from a barrier, so both requests are in the server at
once. Exactly one must answer 202 and the other 409 naming the run the first one created;
``ingest_runs`` must hold exactly one row for the key, and that run must succeed. The database's
partial unique index is what guarantees it; a check-then-insert in the API would let both
through, and this scenario would fail with two 202s.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest

from harness.checks.assertions import assert_loop_log, assert_run_succeeded
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

ROUNDS: Final = 6
JOBS: Final = ("frontend_prices", "stocks")
PROJECT_BASE: Final = 800
LOOP_MODE: Final = "running_loop"
# Every page answers after this long, so a run stays active for several tenths of a second: the
# second POST then meets the first one's run whatever the scheduler does to the two threads.
# Without it a fast run could finish before the second insert, and two runs would be correct.
LATENCY_S: Final = 0.1
_BARRIER_TIMEOUT_S: Final = 10.0


@pytest.fixture(scope="module")
def race_stack(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    # threads: runs of successive rounds proceed side by side instead of queueing up.
    with own_stack(
        services,
        tmp_path_factory.mktemp("concurrent-start"),
        name="concurrent",
        pool="threads",
        loop_mode=LOOP_MODE,
    ) as stack:
        yield stack


def _post_at_once(stack: FullStack, project_id: int, body: dict[str, str]) -> list[httpx.Response]:
    """Two POSTs of ``body`` released together from a barrier, each on its own connection."""
    barrier = threading.Barrier(2)
    path = f"/api/v1/projects/{project_id}/ingest/runs"
    clients = [api_client(stack), api_client(stack)]
    try:
        # Connected beforehand: after the barrier each thread only writes its request.
        for client in clients:
            client.get("/healthz").raise_for_status()

        def fire(client: httpx.Client) -> httpx.Response:
            barrier.wait(_BARRIER_TIMEOUT_S)
            return client.post(path, json=body)

        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(fire, clients))
    finally:
        for client in clients:
            client.close()


def test_two_starts_at_once_make_exactly_one_run(
    race_stack: FullStack, record_property: Any
) -> None:
    stack = race_stack
    accepted: dict[int, tuple[int, str, str]] = {}  # run id: (project, code, job)
    for round_no in range(ROUNDS):
        job = JOBS[round_no % len(JOBS)]
        code = f"race-{round_no}"
        project_id = PROJECT_BASE + round_no
        key = f"round {round_no} ({job} on {code}, project {project_id})"
        stack.marketplace.configure(code, latency_s=LATENCY_S)

        responses = _post_at_once(stack, project_id, {"job_code": job, "marketplace_code": code})

        statuses = sorted(r.status_code for r in responses)
        assert statuses == [202, 409], (
            f"{key}: two starts at once answered {statuses}, expected exactly one 202 and one "
            f"409; bodies: {[r.text for r in responses]}"
        )
        created = next(r for r in responses if r.status_code == 202).json()
        conflict = next(r for r in responses if r.status_code == 409).json()
        run_id = int(created["id"])
        assert f"(run {run_id})" in conflict["detail"], (
            f"{key}: the 409 must name the active run {run_id}: {conflict}"
        )
        rows = stack.store.count_rows(
            "ingest_runs", project_id=project_id, marketplace_code=code, job_code=job
        )
        assert rows == 1, f"{key}: {rows} ingest_runs rows for the key, expected 1"
        accepted[run_id] = (project_id, code, job)

    done = wait_all_terminal(stack.store, list(accepted), timeout=30.0, worker=stack.worker)
    lines = stack.worker.log_lines()
    for run_id, (project_id, code, job) in accepted.items():
        served = stack.marketplace.expected(code, job)
        assert_run_succeeded(
            done[run_id],
            log=lines,
            project_id=project_id,
            **stack.marketplace.served_stats(code, job),
        )
        assert_loop_log(lines, run_id, LOOP_MODE, job_code=job)
        assert_shim_lines(lines, run_id, LOOP_MODE, source=DEFAULT_MODE_SOURCE)
        assert_domain_stored(
            stack.store, job, project_id=project_id, marketplace_code=code, served=served
        )
    record_property("rounds", ROUNDS)
    total = stack.store.count_rows("ingest_runs")
    assert total == ROUNDS, f"{total} runs in the stack's database after {ROUNDS} rounds"
    assert_stack_invariant(stack, accepted.values())
