"""Waiting on real processes without sleeps: a run mid-flight, a heartbeat stale or fresh, a
worker dead, answering its ping, or exited (each a deadline, never a fixed sleep)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta

import psutil

from harness.checks.faults._settings import _LOG_TAIL_LINES, _POLL_S, T
from harness.core.poll import poll_until
from harness.core.runs import RunRow, RunStore
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess, mask_secrets

__all__ = [
    "alive_pids",
    "wait_answers_ping",
    "wait_dead",
    "wait_exited",
    "wait_for",
    "wait_heartbeat_fresh",
    "wait_heartbeat_older_than",
    "wait_mid_run",
]


def wait_for(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` every 10 ms until it returns non-None; TimeoutError saying ``what``.

    ``describe`` adds what was seen last to the error (a row, a log tail).
    """
    result = poll_until(check, timeout=timeout, interval=_POLL_S)
    if result is None:
        seen = f"; last seen: {describe()}" if describe is not None else ""
        raise TimeoutError(f"{what} did not happen within {timeout:g} s{seen}")
    return result


def _log_tail(worker: CeleryWorkerProcess) -> str:
    lines = worker.read_log().splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(f"    {mask_secrets(line)}" for line in lines) or "    (empty)"


def wait_mid_run(
    store: RunStore,
    run_id: int,
    *,
    marketplace: MarketplaceServer,
    code: str,
    worker: CeleryWorkerProcess | None = None,
    timeout: float = 20.0,
) -> RunRow:
    """Wait until run ``run_id`` is ``running`` and the marketplace has had its first request.

    Then the task has claimed the row, its heartbeat thread beats, and the job holds its
    database transaction open while it waits for the (held) source: the moment to provoke a
    fault. Fails at once if the run ends first (the source was not held) or ``worker`` dies.
    """
    last: list[RunRow | None] = [None]

    def check() -> RunRow | None:
        row = store.get(run_id)
        last[0] = row
        if row is not None and row.terminal:
            raise AssertionError(
                f"run {run_id} ended ({row.status}: {row.error_message}) before the fault "
                "could be provoked: hold its source with hold_source() before sending it"
            )
        if worker is not None and not worker.is_alive():
            raise AssertionError(
                f"worker {worker.node_name} exited (code {worker.returncode}) before run "
                f"{run_id} was mid-run; its log:\n{_log_tail(worker)}"
            )
        if row is not None and row.status == "running" and marketplace.requests(code).count:
            return row
        return None

    def describe() -> str:
        row = last[0]
        state = "no row" if row is None else f"status {row.status!r}"
        seen = marketplace.requests(code).count
        tail = f"\n  worker log:\n{_log_tail(worker)}" if worker is not None else ""
        return f"run {run_id}: {state}, {seen} marketplace requests for {code}{tail}"

    return wait_for(
        check, timeout=timeout, what=f"run {run_id} running and fetching", describe=describe
    )


def wait_heartbeat_older_than(
    store: RunStore, run_id: int, age: timedelta, *, timeout: float = 20.0
) -> RunRow:
    """Wait until run ``run_id``'s last heartbeat is older than ``age`` (by the harness's clock,
    the one ``unlock_stale_runs`` judges by); return the row."""

    def check() -> RunRow | None:
        row = store.read(run_id)
        seen = row.heartbeat_at or row.started_at
        return row if seen is not None and datetime.now(UTC) - seen > age else None

    return wait_for(
        check,
        timeout=timeout,
        what=f"run {run_id}'s heartbeat getting older than {age.total_seconds():g} s",
        describe=lambda: repr(store.get(run_id)),
    )


def wait_heartbeat_fresh(
    store: RunStore, run_id: int, within: timedelta, *, timeout: float = 20.0
) -> RunRow:
    """Wait until run ``run_id`` is ``running`` with a heartbeat younger than ``within``.

    Taken just before an unlock, it makes "a live run's heartbeat is fresh" a fact checked at
    that moment, not a bet on the heartbeat thread's timing on a busy machine.
    """

    def check() -> RunRow | None:
        row = store.read(run_id)
        beat = row.heartbeat_at
        fresh = row.status == "running" and beat is not None and datetime.now(UTC) - beat < within
        return row if fresh else None

    return wait_for(
        check,
        timeout=timeout,
        what=f"a heartbeat of run {run_id} younger than {within.total_seconds():g} s",
        describe=lambda: repr(store.get(run_id)),
    )


def alive_pids(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that are still running (a zombie has died; only its entry is left)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def wait_dead(pids: Sequence[int], *, timeout: float = 5.0) -> None:
    """Wait until none of ``pids`` is running (a killed process group's last members)."""
    wait_for(
        lambda: True if not alive_pids(pids) else None,
        timeout=timeout,
        what=f"the end of processes {list(pids)}",
        describe=lambda: f"still running: {alive_pids(pids)}",
    )


def wait_answers_ping(worker: CeleryWorkerProcess, *, timeout: float = 10.0) -> None:
    """Wait until the worker answers a control ping (it is alive and connected to the broker).

    A ping that fails with a broker connection error is retried: after a broker restart the
    harness's own pooled connection is the first to notice it is closed, and kombu drops it.
    """
    errors: list[str] = []

    def check() -> bool | None:
        if not worker.is_alive():
            raise AssertionError(
                f"worker {worker.node_name} exited (code {worker.returncode}); its log:\n"
                f"{_log_tail(worker)}"
            )
        try:
            return True if worker.ping(timeout=0.2) else None
        except Exception as exc:  # the client's connection, not the worker, failed
            errors.append(repr(exc))
            return None

    wait_for(
        check,
        timeout=timeout,
        what=f"worker {worker.node_name} answering a ping",
        describe=lambda: f"errors {errors[-3:]}; its log:\n{_log_tail(worker)}",
    )


def wait_exited(worker: CeleryWorkerProcess, *, timeout: float = 20.0) -> int:
    """Wait until the worker's main process has exited; return its exit code."""
    return wait_for(
        lambda: worker.returncode,
        timeout=timeout,
        what=f"the exit of worker {worker.node_name}",
        describe=lambda: f"still running; its log:\n{_log_tail(worker)}",
    )
