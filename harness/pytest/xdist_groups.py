"""``--dist loadgroup`` that keeps each (pool, broker)'s tests on one xdist worker.

The plugin marks every test that runs on the farm's Celery worker for a (pool, broker) with
``xdist_group("harness-worker-<pool>-<broker>")``, so that under ``--dist loadgroup`` one xdist
worker gets all of them and boots that Celery worker alone. pytest-xdist carries a test's group
from the worker that collected it to the controller that schedules it by appending
``@<group>`` to the test's node id, and on pytest 9.2 that no longer takes effect: node ids
became structured and xdist still writes the old attribute, so every group is silently
dropped (pytest-dev/pytest-xdist#1386, fix pending in #1388).

:class:`HarnessGroupScheduling` is xdist's own ``LoadGroupScheduling`` (groups that do arrive
as ``@<group>`` are kept), plus the harness's groups read from the node id's parameter id,
which carries the pool and broker (``test_success[no_loop-prefork-redis]``,
``test_modes_alternate_on_one_worker[prefork-redis]``). The plugin installs it for
``--dist loadgroup`` only; every other distribution is xdist's, unchanged.
"""

from __future__ import annotations

from xdist.scheduler import LoadGroupScheduling

from harness.core.cell import pair_from_nodeid, worker_group
from harness.matrix.report import without_xdist_group

__all__ = ["HarnessGroupScheduling"]


class HarnessGroupScheduling(LoadGroupScheduling):  # type: ignore[misc]  # xdist: no py.typed
    """xdist's loadgroup, plus one group per (pool, broker) read from the node ids."""

    def _split_scope(self, nodeid: str) -> str:
        if without_xdist_group(nodeid) != nodeid:
            # A group that xdist did carry (pytest before 9.2): xdist's own rule.
            return str(super()._split_scope(nodeid))
        pair = pair_from_nodeid(nodeid)
        return nodeid if pair is None else worker_group(*pair)
