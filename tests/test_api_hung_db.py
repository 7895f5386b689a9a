"""The API against a database that hangs: Postgres stopped with SIGSTOP, as a frozen VM or a
stuck storage layer leaves it. Every runs endpoint answers 503 within a few seconds, with a
clear body, and a start that got its 503 is never carried out once Postgres runs again.

Postgres here is a cluster of this test's own (``LocalPostgres``): the session's is shared.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any, Final

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from app.config import Settings
from fixtures.api import RecordingEnqueue
from harness.services import LocalPostgres, create_database, probe_local

pytestmark = pytest.mark.integration

TIMEOUT_S: Final = 1.5
# The bound plus what a loaded machine adds around it.
ANSWER_WITHIN_S: Final = TIMEOUT_S + 3.0


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    probe = probe_local(os.environ)
    if not probe.ok:
        pytest.skip(f"needs the local Postgres binaries: {probe.detail}")
    with LocalPostgres() as pg:
        yield pg


@pytest.fixture
def hung_api(own_postgres: LocalPostgres, redis_url: str) -> Iterator[dict[str, Any]]:
    from app.api import create_app
    from app.migrations import upgrade
    from harness.workers.http import UvicornServer

    url = create_database(own_postgres.admin_url, "ingest")
    upgrade(url)
    token = "hung-db-token"
    settings = Settings(
        database_url=url,
        broker_url=redis_url,
        api_tokens=f"{token}=*",
        api_db_timeout_s=TIMEOUT_S,
    )
    enqueue = RecordingEnqueue()
    with UvicornServer(create_app(settings, enqueue=enqueue)) as server:
        client = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0
        )
        try:
            yield {"client": client, "enqueue": enqueue, "url": url, "pg": own_postgres}
        finally:
            client.close()


@contextlib.contextmanager
def stopped(pg: LocalPostgres) -> Iterator[None]:
    """Every process of the cluster stopped: the postmaster first (so it forks no new backend),
    then each of its children (each is a session leader of its own: no process group to hit)."""
    assert pg.pid is not None
    postmaster = psutil.Process(pg.pid)
    postmaster.suspend()
    children = postmaster.children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.suspend()
    try:
        yield
    finally:
        for proc in [*children, postmaster]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()


def _timed(call: Any) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    response = call()
    return response, time.monotonic() - began


def test_a_hung_database_gets_503s_in_seconds_and_no_late_start(hung_api: dict[str, Any]) -> None:
    client: httpx.Client = hung_api["client"]
    enqueue: RecordingEnqueue = hung_api["enqueue"]
    payload = {"job_code": "frontend_prices", "marketplace_code": "demo"}
    first = client.post("/api/v1/projects/1/ingest/runs", json=payload)
    assert first.status_code == 202, first.text
    run_id = first.json()["id"]

    with stopped(hung_api["pg"]):
        # The start first: it takes the pooled connection, which is open, so it waits inside
        # a query (no connect timeout can end that) until Postgres runs again.
        answers = {
            "start": _timed(
                lambda: client.post(
                    "/api/v1/projects/1/ingest/runs",
                    json={**payload, "marketplace_code": "late"},
                )
            ),
            "list": _timed(lambda: client.get("/api/v1/projects/1/ingest/runs")),
            "detail": _timed(lambda: client.get(f"/api/v1/projects/1/ingest/runs/{run_id}")),
            "healthz": _timed(lambda: client.get("/healthz")),
        }
    for name, (response, took) in answers.items():
        assert response.status_code == 503, (name, response.text)
        assert took <= ANSWER_WITHIN_S, f"{name} took {took:.1f} s"
    for name in ("list", "detail", "start"):
        detail = answers[name][0].json()["detail"]
        assert detail.startswith("the database did not answer: no answer within 1.5 s"), detail

    # Postgres runs again: the stuck start's thread resumes at once, and must not make a run
    # that runs. Once the API answers again, that thread has had a second to finish.
    deadline = time.monotonic() + 15
    while client.get("/api/v1/projects/1/ingest/runs").status_code != 200:
        assert time.monotonic() < deadline, "the API did not recover after Postgres resumed"
        time.sleep(0.1)
    time.sleep(1.0)
    engine = create_engine(hung_api["url"])
    try:
        with engine.connect() as conn:
            late = (
                conn.execute(text("SELECT status FROM ingest_runs WHERE marketplace_code = 'late'"))
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    assert all(status == "failed" for status in late), late
    assert enqueue.run_ids == [run_id], "the start that got a 503 was enqueued after all"
