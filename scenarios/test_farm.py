"""The worker farm's own promise: a worker that died is replaced on next use, and reported.

Uses the session's farm (the solo worker, which the matrix starts anyway), so it costs one
extra worker start; the restarted worker then serves the rest of the session as before.
"""

from __future__ import annotations

import signal

import pytest

from harness.core.runs import RunStore
from harness.workers.farm import WorkerFarm, WorkerRuns
from harness.workers.marketplace import MarketplaceServer

pytestmark = pytest.mark.integration


def test_a_dead_worker_is_restarted_on_next_use_and_reported(
    worker_farm: WorkerFarm,
    run_store: RunStore,
    marketplace: MarketplaceServer,
    marketplace_code: str,
) -> None:
    first = worker_farm.worker("solo", "redis")
    deaths_before = len(worker_farm.deaths)

    first.kill(signal.SIGKILL)  # as the OOM killer would
    second = worker_farm.worker("solo", "redis")

    assert second is not first
    assert second.is_alive()
    assert second.node_name != first.node_name  # a fresh queue: nothing stale is redelivered
    [death] = worker_farm.deaths[deaths_before:]
    assert (death.pool, death.broker, death.node_name) == ("solo", "redis", first.node_name)
    assert death.returncode == -signal.SIGKILL
    assert "killed by signal 9" in death.describe()
    assert worker_farm.worker("solo", "redis") is second  # cached again
    done = WorkerRuns(second, run_store).run("running_loop", marketplace_code=marketplace_code)
    assert done.row.status == "success", done.row
