"""4. Redis restarted while the worker is idle, and while a run is queued: the worker reconnects
and the run completes.

The broker here is a Redis of the module's own (``LocalRedis``), so restarting it disturbs no
other scenario's worker; ``LocalRedis.restart()`` stops it and starts a new server on the same
port and dir, since a worker's broker URL is fixed. A restart that keeps the dataset (``SHUTDOWN
SAVE`` then a load, as a Redis with persistence does) keeps the queued message; one without
persistence loses it, and then the run waits in ``queued`` until ``unlock_stale_runs`` frees its
slot (the third case: the runbook's stuck run again, with the script as its remedy).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from app.maintenance import MESSAGE_PREFIX, unlock_stale_runs
from harness.checks.assertions import assert_run_succeeded
from harness.checks.faults import (
    STALE_AFTER,
    FaultWorkers,
    assert_fault_invariants,
    queued_messages,
    release_source,
    served_rows,
    start_held_run,
    wait_acknowledged,
    wait_answers_ping,
    wait_for,
)
from harness.core.logs import LogLine
from harness.core.runs import RunRow, RunStore
from harness.services import LocalRedis, ServicesUnavailable
from harness.workers.marketplace import MarketplaceServer
from harness.workers.process import CeleryWorkerProcess

pytestmark = pytest.mark.integration

PROJECT_ID = 14
DOMAIN = "frontend_prices"
# Celery's warning when the broker connection drops (its traceback goes to DEBUG only).
CONNECTION_LOST = "Connection to broker lost"
CONNECTED = "Connected to redis://"
# The service's warning when the broker connection closed before a finished run's ack.
UNACKED_WARNING = "Could not acknowledge the message of run {run_id}: its broker connection closed"


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A Redis only this module's worker uses: restarting it disturbs no other scenario."""
    server = LocalRedis(workdir=tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except ServicesUnavailable as exc:
        pytest.skip(f"a restart needs a local redis-server binary: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_broker_url(own_redis: LocalRedis) -> str:
    """This module's fault workers use the module's own Redis."""
    return own_redis.url


def _succeeded(row: RunRow, lines: list[LogLine], marketplace: MarketplaceServer) -> None:
    assert_run_succeeded(
        row,
        log=lines,
        project_id=PROJECT_ID,
        **marketplace.served_stats(row.marketplace_code, DOMAIN),
    )


def _reconnected(lines: list[LogLine]) -> bool:
    lost = [i for i, x in enumerate(lines) if CONNECTION_LOST in x.headline]
    return bool(lost) and any(CONNECTED in x.headline for x in lines[lost[-1] :])


def _saw_the_restart(worker: CeleryWorkerProcess) -> None:
    """The worker logged losing the broker, then connecting to it again."""
    worker.wait_for_log(_reconnected, what="the worker losing the broker and connecting again")


def _one_busy_one_queued(
    worker: CeleryWorkerProcess,
    store: RunStore,
    marketplace: MarketplaceServer,
    own_redis: LocalRedis,
) -> tuple[tuple[int, str], tuple[int, str]]:
    """A run held mid-run on ``worker``, and a second one whose message waits in Redis.

    Returns (run id, marketplace code) of each; the busy run's source stays held.
    """
    busy, busy_code = start_held_run(store, worker, marketplace, project_id=PROJECT_ID)
    queued_code = f"mp-{uuid.uuid4().hex[:8]}"
    # The worker is busy with one task at a time: the second message waits in Redis.
    queued = store.create(project_id=PROJECT_ID, marketplace_code=queued_code)
    worker.send(queued, loop_mode="no_loop")
    assert queued_messages(own_redis.url, worker.queue) == 1
    return (busy, busy_code), (queued, queued_code)


def test_restart_keeps_the_port_and_optionally_the_data(own_redis: LocalRedis) -> None:
    port, pid = own_redis.port, own_redis.pid
    client = redis.Redis.from_url(own_redis.url)
    try:
        client.set("fault-probe", "kept")
        own_redis.restart(keep_data=True)
        assert (own_redis.port, own_redis.url) == (port, f"redis://127.0.0.1:{port}/0")
        assert own_redis.pid != pid
        assert client.get("fault-probe") == b"kept"
        own_redis.restart(keep_data=False)
        assert client.get("fault-probe") is None
    finally:
        client.close()


def test_restart_while_the_worker_is_idle(
    fault_workers: FaultWorkers,
    own_redis: LocalRedis,
    fault_store: RunStore,
    marketplace: MarketplaceServer,
) -> None:
    worker = fault_workers.start()
    own_redis.restart(keep_data=False)  # an idle worker has nothing to lose
    _saw_the_restart(worker)
    # Answering a ping means its consumers are back (the control one starts after the task
    # one, which declares the queue again on the empty server).
    wait_answers_ping(worker)

    code = f"mp-{uuid.uuid4().hex[:8]}"
    run_id = fault_store.create(project_id=PROJECT_ID, marketplace_code=code)
    worker.send(run_id, loop_mode="no_loop")
    _succeeded(fault_store.wait_terminal(run_id), worker.log_lines(), marketplace)
    wait_answers_ping(worker)
    assert_fault_invariants(
        fault_store,
        fault_workers.log_lines(),
        expected_rows=served_rows(marketplace, code, project_id=PROJECT_ID),
    )


def test_restart_while_a_run_is_queued(
    fault_workers: FaultWorkers,
    own_redis: LocalRedis,
    fault_store: RunStore,
    marketplace: MarketplaceServer,
) -> None:
    worker = fault_workers.start()
    (busy, busy_code), (queued, queued_code) = _one_busy_one_queued(
        worker, fault_store, marketplace, own_redis
    )

    own_redis.restart(keep_data=True)

    assert queued_messages(own_redis.url, worker.queue) == 1, "the restart lost the message"
    assert fault_store.read(queued).status == "queued"
    release_source(marketplace, busy_code)
    _succeeded(fault_store.wait_terminal(busy), worker.log_lines(), marketplace)
    _succeeded(fault_store.wait_terminal(queued), worker.log_lines(), marketplace)
    _saw_the_restart(worker)
    wait_answers_ping(worker)
    # The busy run's message was delivered before the restart; its ack went to the new server.
    wait_acknowledged(own_redis.url, worker.queue)
    assert_fault_invariants(
        fault_store,
        fault_workers.log_lines(),
        expected_rows={
            **served_rows(marketplace, busy_code, project_id=PROJECT_ID),
            **served_rows(marketplace, queued_code, project_id=PROJECT_ID),
        },
    )


def test_restart_without_persistence_loses_the_message_and_the_script_frees_the_run(
    fault_workers: FaultWorkers,
    own_redis: LocalRedis,
    fault_store: RunStore,
    fault_db: str,
    marketplace: MarketplaceServer,
) -> None:
    worker = fault_workers.start()
    (busy, busy_code), (lost, _) = _one_busy_one_queued(worker, fault_store, marketplace, own_redis)

    own_redis.restart(keep_data=False)

    release_source(marketplace, busy_code)
    _succeeded(fault_store.wait_terminal(busy), worker.log_lines(), marketplace)
    _saw_the_restart(worker)
    wait_answers_ping(worker)
    assert queued_messages(own_redis.url, worker.queue) == 0
    assert fault_store.read(lost).status == "queued", "the lost message cannot have run"
    wait_for(
        lambda: True if unlock_stale_runs(fault_db, older_than=STALE_AFTER) else None,
        timeout=10.0,
        what=f"unlock_stale_runs finding run {lost} stale",
    )
    freed = fault_store.read(lost)
    assert freed.status == "failed" and freed.started_at is None, freed
    assert (freed.error_message or "").startswith(
        f"{MESSAGE_PREFIX}: status was queued, created "
    ), freed.error_message
    assert "never started" in (freed.error_message or "")
    assert freed.finished_at is not None and freed.duration_ms is not None, freed
    report = assert_fault_invariants(
        fault_store,
        fault_workers.log_lines(),
        expected_rows=served_rows(marketplace, busy_code, project_id=PROJECT_ID),
    )
    assert report.recovered == [lost]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_run_that_ends_while_redis_is_down_leaves_the_worker_up(
    pool: str,
    fault_workers: FaultWorkers,
    own_redis: LocalRedis,
    fault_store: RunStore,
    marketplace: MarketplaceServer,
) -> None:
    """The run's task returns while the broker is gone: Celery acknowledges its message on the
    channel of the closed connection, where kombu's Redis transport raised AttributeError and
    Celery's consumer took the worker down ("Unrecoverable error"). The worker must stay up and
    reconnect, the row must be the run's, and the message, never acknowledged, must come back
    as a no-op after the visibility timeout (short here)."""
    # Two slots, one busy: the worker is waiting in BRPOP for more when Redis goes away. Closing
    # that channel fails, and the connection's close then tries it again with its transport
    # already gone: where kombu raised AttributeError. The visibility timeout is longer than
    # the run is held before the outage (6 s at load 9 in a CI run; with 2 s the message came
    # back while the run still ran), so its redelivery comes after the reconnect.
    worker = fault_workers.start(pool=pool, concurrency=2, APP_BROKER_VISIBILITY_TIMEOUT_S="15")
    run_id, code = start_held_run(fault_store, worker, marketplace, project_id=PROJECT_ID)
    ended: list[RunRow] = []
    errors: list[BaseException] = []

    def end_the_run_during_the_outage() -> None:
        try:
            worker.wait_for_log(
                lambda lines: any(CONNECTION_LOST in x.headline for x in lines),
                what="the worker losing the broker",
            )
            release_source(marketplace, code)
            ended.append(fault_store.wait_terminal(run_id, timeout=10.0))
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    helper = threading.Thread(target=end_the_run_during_the_outage, name="end-the-run")
    helper.start()
    own_redis.restart(keep_data=True, down_for=4.0)
    helper.join(timeout=30.0)
    assert not helper.is_alive(), "the helper did not finish"
    if errors:
        raise errors[0]
    _saw_the_restart(worker)
    assert worker.is_alive(), "the worker exited:\n" + worker.read_log()[-3000:]
    wait_answers_ping(worker)
    _succeeded(ended[0], worker.log_lines(), marketplace)
    lines = worker.wait_for_log(
        lambda lines: any(
            x.headline == f"Run {run_id} is not queued (status: success); not executing it again"
            for x in lines
        ),
        timeout=45.0,
        what="the unacknowledged message delivered again, as a no-op",
    )
    assert any(UNACKED_WARNING.format(run_id=run_id) in x.headline for x in lines), (
        "the worker did not say that it could not acknowledge the run's message"
    )
    wait_acknowledged(own_redis.url, worker.queue)
    assert fault_store.read(run_id) == ended[0], "the no-op changed the finished row"
    assert_fault_invariants(
        fault_store,
        fault_workers.log_lines(),
        expected_rows=served_rows(marketplace, code, project_id=PROJECT_ID),
    )
