"""Fault tools: provoke the runbook's "Отладка" failures on the real stack and check what is left.

The runbook's debugging section is about runs stuck in ``running``, workers that fall over and
ingestions that never finish. These plain functions and classes let a scenario cause each of
those on real processes -- kill or stop a worker, drop the database's connections, hold the
marketplace so a run is reliably mid-flight -- and then assert the one invariant every fault
must leave behind (:func:`assert_fault_invariants`). The fault scenarios are in
``scenarios/faults/``; ``docs/faults.md`` says what each proves.

The rooms: ``waits`` (deadlines on processes and rows), ``source`` (the marketplace as a
valve), ``postgres`` and ``broker`` (the two servers' faults), ``workers`` (the fault
workers), ``invariants`` (what must hold after any fault); this package's names are theirs.

Timing is never a blind sleep: a run is "mid-run" once its row is ``running`` and the marketplace
has seen its first request (:func:`wait_mid_run`), and the marketplace keeps it there until
:func:`release_source`.

Exceptions::

    CheckFailed (harness.core.errors, an AssertionError)
     └── FaultInvariantError   a run left active, a duplicated or missing domain row, or an
                               unexpected traceback in a worker log after a fault
    TimeoutError               a wait's condition did not hold in time (with what was seen)
"""

from __future__ import annotations

from harness.checks.faults._settings import (
    FAULT_WORKER_APP,
    HEARTBEAT_INTERVAL_S,
    HELD_LATENCY_S,
    REDELIVERY_TRANSPORT_OPTIONS,
    STALE_AFTER,
    RowsKey,
)
from harness.checks.faults.broker import (
    delete_queue,
    forget_unacked,
    message_in_redis,
    queued_messages,
    unacked_messages,
    wait_acknowledged,
)
from harness.checks.faults.invariants import (
    FaultInvariantError,
    FaultReport,
    assert_fault_invariants,
)
from harness.checks.faults.postgres import Backend, BackendTerminator, terminate_backends
from harness.checks.faults.source import hold_source, release_source, served_rows, start_held_run
from harness.checks.faults.waits import (
    alive_pids,
    wait_answers_ping,
    wait_dead,
    wait_exited,
    wait_for,
    wait_heartbeat_fresh,
    wait_heartbeat_older_than,
    wait_mid_run,
)
from harness.checks.faults.workers import FaultWorkers

__all__ = [
    "FAULT_WORKER_APP",
    "HEARTBEAT_INTERVAL_S",
    "HELD_LATENCY_S",
    "REDELIVERY_TRANSPORT_OPTIONS",
    "STALE_AFTER",
    "Backend",
    "BackendTerminator",
    "FaultInvariantError",
    "FaultReport",
    "FaultWorkers",
    "RowsKey",
    "alive_pids",
    "assert_fault_invariants",
    "delete_queue",
    "forget_unacked",
    "hold_source",
    "message_in_redis",
    "queued_messages",
    "release_source",
    "served_rows",
    "start_held_run",
    "terminate_backends",
    "unacked_messages",
    "wait_acknowledged",
    "wait_answers_ping",
    "wait_dead",
    "wait_exited",
    "wait_for",
    "wait_heartbeat_fresh",
    "wait_heartbeat_older_than",
    "wait_mid_run",
]
