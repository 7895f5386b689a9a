"""The matrix's vocabulary, in one place: the names of loop modes, pools, brokers, runners and
service modes, and :class:`Cell`, the one type a cell has wherever it crosses a boundary.

A cell is ``(mode, pool, broker)``; the ``in_process`` cell has no worker, so its pool and
broker are ``"-"``. Its forms, each made and read here only:

- the test id pytest shows: ``running_loop-prefork-redis``, or ``in_process`` (:attr:`Cell.id`,
  :meth:`Cell.from_nodeid`);
- the label of tables and reports: ``running_loop/prefork/redis`` (:attr:`Cell.label`);
- the ``matrix_cell`` property a scenario records: ``running_loop|prefork|redis``
  (:attr:`Cell.property_value`, :meth:`Cell.from_property`);
- the xdist group of the tests served by one Celery worker: ``harness-worker-prefork-redis``
  (:func:`worker_group`, :func:`pair_from_nodeid`).

This module imports nothing of the harness: every layer may use it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from itertools import pairwise
from typing import Final, Literal, NamedTuple, get_args

__all__ = [
    "BROKERS",
    "CELL_PROPERTY",
    "DEFAULT_BROKERS",
    "DEFAULT_LOOP_MODES",
    "DEFAULT_POOLS",
    "IN_PROCESS",
    "LOOP_MODES",
    "MATRIX_MODES",
    "MODE_POOLS",
    "NO_WORKER",
    "POOLS",
    "RUNNERS",
    "SERVICE_MODES",
    "SLOW_BOOT_POOLS",
    "XDIST_GROUP_PREFIX",
    "Broker",
    "Cell",
    "LoopMode",
    "RunnerName",
    "ServiceModeName",
    "mode_applies",
    "pair_from_nodeid",
    "worker_group",
]

Broker = Literal["redis", "amqp"]
ServiceModeName = Literal["auto", "docker", "local", "external", "compose"]
# Which runner the workers use: the service's own (fixed), or the pre-fix plain asyncio.run()
# that the harness puts in its place to prove that it detects the runbook's bug (prefix).
RunnerName = Literal["fixed", "prefix"]


class LoopMode(enum.StrEnum):
    """A condition of the worker thread when the task body runs (harness.workers.loopmodes forces
    it)."""

    NO_LOOP = "no_loop"
    IDLE_LOOP = "idle_loop"
    CLOSED_LOOP = "closed_loop"
    INHERITED_LOOP = "inherited_loop"
    RUNNING_LOOP = "running_loop"
    RUNNING_UVLOOP = "running_uvloop"


LOOP_MODES: Final = tuple(mode.value for mode in LoopMode)
# The task's function called inside the test's own running loop: no worker at all.
IN_PROCESS: Final = "in_process"
MATRIX_MODES: Final = (*LOOP_MODES, IN_PROCESS)
DEFAULT_LOOP_MODES: Final = MATRIX_MODES
# A loop mode that exists on some pools only: the fork-inherited loop needs a pool that forks.
MODE_POOLS: Final[Mapping[str, tuple[str, ...]]] = {"inherited_loop": ("prefork",)}


def mode_applies(mode: str, pool: str) -> bool:
    """Whether ``mode`` is a condition a worker of ``pool`` can be in."""
    return pool in MODE_POOLS.get(mode, (pool,))


POOLS: Final = ("prefork", "solo", "threads", "gevent")
DEFAULT_POOLS: Final = ("prefork", "solo", "threads")
# The pools whose worker takes longest to be ready: prefork forks a pool of processes and warms
# each; gevent is exec'ed (the fork server cannot fork it: harness.workers.forkserver). Their
# tests run after the others', so that the quick workers' tests run while these boot.
SLOW_BOOT_POOLS: Final = ("prefork", "gevent")
BROKERS: Final[tuple[str, ...]] = get_args(Broker)
DEFAULT_BROKERS: Final = ("redis",)
RUNNERS: Final[tuple[str, ...]] = get_args(RunnerName)
SERVICE_MODES: Final[tuple[str, ...]] = get_args(ServiceModeName)

NO_WORKER: Final = "-"
CELL_PROPERTY: Final = "matrix_cell"
XDIST_GROUP_PREFIX: Final = "harness-worker-"


class Cell(NamedTuple):
    """One cell of the matrix. A tuple, so ``mode, pool, broker = cell`` reads it."""

    mode: str
    pool: str = NO_WORKER
    broker: str = NO_WORKER

    @property
    def in_process(self) -> bool:
        return self.pool == NO_WORKER

    @property
    def id(self) -> str:
        """pytest's parameter id: ``mode-pool-broker``, or the mode alone in process."""
        return self.mode if self.in_process else f"{self.mode}-{self.pool}-{self.broker}"

    @property
    def label(self) -> str:
        """``mode/pool/broker`` for tables and reports, or the mode alone in process."""
        return self.mode if self.in_process else f"{self.mode}/{self.pool}/{self.broker}"

    @property
    def property_value(self) -> str:
        """What a scenario records as its :data:`CELL_PROPERTY`."""
        return f"{self.mode}|{self.pool}|{self.broker}"

    @property
    def worker_group(self) -> str | None:
        """The xdist group of its worker's tests; None in process."""
        return None if self.in_process else worker_group(self.pool, self.broker)

    @classmethod
    def from_property(cls, value: object) -> Cell | None:
        """A recorded :attr:`property_value` back into a cell; None if malformed."""
        if not isinstance(value, str):
            return None
        parts = value.split("|")
        if len(parts) != 3 or not all(parts):
            return None
        return cls(parts[0], parts[1], parts[2])

    @classmethod
    def from_nodeid(cls, nodeid: str) -> Cell | None:
        """The cell in a node id's ``[...]``, found by its names wherever it stands (other
        parametrizations may be joined to it with ``-`` on either side); None if there is none.
        """
        tokens = _param_tokens(nodeid)
        for i, token in enumerate(tokens):
            if token == IN_PROCESS:
                return cls(token)
            if token in LOOP_MODES and i + 2 < len(tokens):
                pool, broker = tokens[i + 1], tokens[i + 2]
                if pool in POOLS and broker in BROKERS:
                    return cls(token, pool, broker)
        return None


def worker_group(pool: str, broker: str) -> str:
    """The xdist group of the tests that run on the farm's worker for (pool, broker)."""
    return f"{XDIST_GROUP_PREFIX}{pool}-{broker}"


def pair_from_nodeid(nodeid: str) -> tuple[str, str] | None:
    """The (pool, broker) in a node id's parameter id: ``pool-broker`` as adjacent tokens."""
    for pool, broker in pairwise(_param_tokens(nodeid)):
        if pool in POOLS and broker in BROKERS:
            return (pool, broker)
    return None


def _param_tokens(nodeid: str) -> list[str]:
    open_at = nodeid.find("[")
    close_at = nodeid.rfind("]")
    if open_at < 0 or close_at < open_at:
        return []
    return nodeid[open_at + 1 : close_at].split("-")
