"""A table reset never deletes a run that holds it off (harness.core.runs): the farm's warm-up
runs go on while the first tests empty the runs' table on the same database."""

from __future__ import annotations

import threading
import time

import pytest

from harness.core.runs import RunStore, reset_tables
from harness.core.target import Target

pytestmark = pytest.mark.integration


def test_a_reset_waits_for_the_runs_that_hold_it_off(clean_db: str, harness_target: Target) -> None:
    with RunStore(clean_db) as store:
        done = threading.Event()

        def reset() -> None:
            reset_tables(store.engine, harness_target.reset_tables)
            done.set()

        with store.no_reset():
            run_id = store.create(project_id=0, marketplace_code="held")
            resetter = threading.Thread(target=reset)
            resetter.start()
            # Long enough for an unblocked TRUNCATE to have finished many times over.
            time.sleep(0.5)
            assert not done.is_set(), "the reset did not wait for the run that holds it off"
            assert store.get(run_id) is not None
        resetter.join(timeout=10)

        assert done.is_set(), "the reset did not go on once the run let go"
        assert store.get(run_id) is None  # the reset did empty the table, afterwards
        assert store.create(project_id=1, marketplace_code="after") == 1  # ids restarted
