"""The HTTP API against a live uvicorn and a real Postgres (only the enqueue is a recorder)."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import Engine, create_engine, func, insert, select, update

from app.api import create_app
from app.config import Settings
from app.ingest import job_codes
from app.models import IngestRun
from fixtures.api import ApiTokens, RecordingEnqueue
from harness.workers.http import UvicornServer

RUNS = "/api/v1/projects/{project}/ingest/runs"
RUNBOOK_KEYS = [
    "id",
    "status",
    "started_at",
    "finished_at",
    "duration_ms",
    "stats_json",
    "error_message",
    "project_id",
    "marketplace_code",
    "job_code",
    "created_at",
]
UTC_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
T0 = datetime(2026, 1, 27, 10, 0, 0, tzinfo=UTC)


def runs_url(project: int, run_id: int | None = None) -> str:
    base = RUNS.format(project=project)
    return base if run_id is None else f"{base}/{run_id}"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def db(clean_db: str) -> Iterator[Engine]:
    engine = create_engine(clean_db)
    yield engine
    engine.dispose()


def insert_run(engine: Engine, **values: Any) -> int:
    row = {"project_id": 1, "marketplace_code": "demo", "job_code": "frontend_prices"}
    row.update(values)
    if row.get("status") in ("success", "failed"):
        # The table refuses a terminal row that does not say when it ended and how long it took.
        ended = row.get("created_at") or datetime.now(UTC)
        row.setdefault("finished_at", ended)
        row.setdefault("duration_ms", 0)
    with engine.begin() as conn:
        return int(
            conn.execute(insert(IngestRun).values(**row).returning(IngestRun.id)).scalar_one()
        )


def read_run(engine: Engine, run_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(IngestRun).where(IngestRun.id == run_id)).one()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- POST: starting runs ---------------------------------------------------------------------


def test_post_creates_a_queued_run_and_enqueues_it(
    api_client: httpx.Client, api_enqueue: RecordingEnqueue, db: Engine
) -> None:
    response = api_client.post(
        runs_url(1), json={"job_code": "frontend_prices", "marketplace_code": "demo"}
    )

    assert response.status_code == 202, response.text
    body = response.json()
    assert list(body) == RUNBOOK_KEYS
    assert body["status"] == "queued"
    assert (body["project_id"], body["marketplace_code"], body["job_code"]) == (
        1,
        "demo",
        "frontend_prices",
    )
    assert body["started_at"] is None and body["finished_at"] is None
    assert UTC_Z.match(body["created_at"]), body["created_at"]
    assert response.headers["Location"] == runs_url(1, body["id"])
    assert api_enqueue.run_ids == [body["id"]]
    row = read_run(db, body["id"])
    assert row.status == "queued"
    assert row.celery_task_id == f"recorded-task-{body['id']}"


def test_second_active_run_of_the_same_key_is_a_conflict(
    api_client: httpx.Client, api_enqueue: RecordingEnqueue, db: Engine
) -> None:
    payload = {"job_code": "frontend_prices", "marketplace_code": "demo"}
    first = api_client.post(runs_url(1), json=payload).json()

    second = api_client.post(runs_url(1), json=payload)

    assert second.status_code == 409, second.text
    assert f"run {first['id']}" in second.json()["detail"]
    assert api_enqueue.run_ids == [first["id"]]
    # Another marketplace is another key; a finished run no longer blocks its key.
    other = api_client.post(runs_url(1), json={**payload, "marketplace_code": "other"})
    assert other.status_code == 202, other.text
    with db.begin() as conn:
        conn.execute(
            update(IngestRun)
            .where(IngestRun.id == first["id"])
            .values(status="success", finished_at=func.now(), duration_ms=1)
        )
    again = api_client.post(runs_url(1), json=payload)
    assert again.status_code == 202, again.text


def test_concurrent_starts_create_exactly_one_run(
    api_server: UvicornServer, api_tokens: ApiTokens, api_enqueue: RecordingEnqueue
) -> None:
    # The partial unique index decides, not a check-then-insert: racing requests must not
    # both get through.
    payload = {"job_code": "stocks", "marketplace_code": "race"}
    barrier = threading.Barrier(8)
    codes: list[int] = []

    def start() -> None:
        with httpx.Client(base_url=api_server.url, headers=bearer(api_tokens.project1)) as c:
            barrier.wait()
            codes.append(c.post(runs_url(1), json=payload).status_code)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(codes) == [202] + [409] * 7
    assert len(api_enqueue.run_ids) == 1


def test_unknown_job_code_is_422_listing_the_known_codes(api_client: httpx.Client) -> None:
    response = api_client.post(
        runs_url(1), json={"job_code": "no_such_job", "marketplace_code": "demo"}
    )

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "job_code"]
    assert "unknown job_code 'no_such_job'" in error["msg"]
    for code in job_codes():
        assert code in error["msg"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "job_code"),
        ({"job_code": "frontend_prices"}, "marketplace_code"),
        ({"job_code": "frontend_prices", "marketplace_code": ""}, "marketplace_code"),
        ({"job_code": "frontend_prices", "marketplace_code": "has space"}, "marketplace_code"),
        ({"job_code": "frontend_prices", "marketplace_code": "x" * 65}, "marketplace_code"),
        ({"job_code": "frontend_prices", "marketplace_code": "nul\x00"}, "marketplace_code"),
        ({"job_code": "frontend_prices", "marketplace_code": "demo\n"}, "marketplace_code"),
        ({"job_code": 5, "marketplace_code": "demo"}, "job_code"),
        ({"job_code": "stocks", "marketplace_code": "demo", "extra": 1}, "extra"),
        (["not", "an", "object"], "body"),
    ],
)
def test_bad_body_is_422_naming_the_field(
    api_client: httpx.Client, api_enqueue: RecordingEnqueue, body: Any, field: str
) -> None:
    response = api_client.post(runs_url(1), json=body)

    assert response.status_code == 422, response.text
    locations = [error["loc"] for error in response.json()["detail"]]
    assert any(loc[-1] == field for loc in locations), locations
    assert api_enqueue.run_ids == []


def test_a_bad_marketplace_code_is_said_in_words_not_as_a_regex(api_client: httpx.Client) -> None:
    response = api_client.post(
        runs_url(1), json={"job_code": "frontend_prices", "marketplace_code": "has space"}
    )

    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "loc": ["body", "marketplace_code"],
            "msg": "marketplace_code must be letters, digits, '_', '.', '-'; 1 to 64 characters",
            "type": "string_pattern_mismatch",
        }
    ]


def test_a_422_never_echoes_the_input(api_client: httpx.Client) -> None:
    big = "x" * 7_000  # the body stays under its limit; far over any field's
    response = api_client.post(runs_url(1), json={"job_code": big, "marketplace_code": big})

    assert response.status_code == 422
    assert len(response.content) < 1000, response.text[:300]
    assert big[:200] not in response.text


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_413_before_it_is_parsed(
    api_client: httpx.Client, api_enqueue: RecordingEnqueue, chunked: bool
) -> None:
    payload = json.dumps({"job_code": "stocks", "marketplace_code": "demo", "pad": "x" * 1_000_000})
    body: Any = payload.encode()
    if chunked:  # no Content-Length: the bound is found while the bytes arrive

        def chunks() -> Iterator[bytes]:
            raw = payload.encode()
            for i in range(0, len(raw), 65536):
                yield raw[i : i + 65536]

        body = chunks()
    response = api_client.post(
        runs_url(1), content=body, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 413, response.text[:300]
    detail = response.json()["detail"]
    assert "the request body is too large" in detail and "APP_API_MAX_BODY_BYTES" in detail
    assert len(response.content) < 300
    assert api_enqueue.run_ids == []


def test_body_that_is_not_json_is_422(api_client: httpx.Client) -> None:
    response = api_client.post(
        runs_url(1), content=b"job_code=stocks", headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


# --- GET: reading runs -----------------------------------------------------------------------


def test_get_run_renders_the_runbook_object(api_client: httpx.Client, db: Engine) -> None:
    started = T0 + timedelta(microseconds=123456)
    run_id = insert_run(
        db,
        status="success",
        created_at=T0,
        started_at=started,
        finished_at=started + timedelta(minutes=5),
        duration_ms=300000,
        stats_json={"ok": True, "project_id": 1, "domain": "frontend_prices", "rows": 42},
    )

    response = api_client.get(runs_url(1, run_id))

    assert response.status_code == 200
    body = response.json()
    assert list(body) == RUNBOOK_KEYS
    assert body == {
        "id": run_id,
        "status": "success",
        "started_at": "2026-01-27T10:00:00.123456Z",
        "finished_at": "2026-01-27T10:05:00.123456Z",
        "duration_ms": 300000,
        "stats_json": {"ok": True, "project_id": 1, "domain": "frontend_prices", "rows": 42},
        "error_message": None,
        "project_id": 1,
        "marketplace_code": "demo",
        "job_code": "frontend_prices",
        "created_at": "2026-01-27T10:00:00.000000Z",
    }


def test_get_failed_run_shows_its_error(api_client: httpx.Client, db: Engine) -> None:
    # Written with a +03:00 offset, read back as UTC with Z.
    plus3 = datetime(2026, 1, 27, 16, 0, 0, tzinfo=timezone(timedelta(hours=3)))
    run_id = insert_run(
        db,
        status="failed",
        created_at=plus3,
        started_at=plus3,
        finished_at=plus3 + timedelta(milliseconds=1500),
        duration_ms=1500,
        error_message="HTTPStatusError: the source answered 503",
    )

    body = api_client.get(runs_url(1, run_id)).json()

    assert body["status"] == "failed"
    assert body["error_message"] == "HTTPStatusError: the source answered 503"
    assert body["stats_json"] is None
    assert body["duration_ms"] == 1500
    assert body["started_at"] == "2026-01-27T13:00:00.000000Z"
    assert body["finished_at"] == "2026-01-27T13:00:01.500000Z"


def test_list_is_newest_first_and_limit_one_is_the_last_run(
    api_client: httpx.Client, db: Engine
) -> None:
    ids = [insert_run(db, status="success", created_at=T0 + timedelta(minutes=i)) for i in range(3)]
    insert_run(db, project_id=2, created_at=T0 + timedelta(hours=1))  # never shown to project 1

    everything = api_client.get(runs_url(1))
    last = api_client.get(runs_url(1), params={"limit": 1})

    assert everything.status_code == 200
    assert [run["id"] for run in everything.json()] == ids[::-1]
    assert last.json() == [everything.json()[0]]
    assert list(last.json()[0]) == RUNBOOK_KEYS


@pytest.mark.parametrize("limit", [0, 101, -1, "many"])
def test_list_limit_out_of_bounds_is_422(api_client: httpx.Client, limit: object) -> None:
    response = api_client.get(runs_url(1), params={"limit": str(limit)})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "limit"]


def test_list_limit_bounds_are_inclusive(api_client: httpx.Client, db: Engine) -> None:
    for i in range(3):
        insert_run(db, status="success", created_at=T0 + timedelta(seconds=i))

    assert len(api_client.get(runs_url(1), params={"limit": 1}).json()) == 1
    assert len(api_client.get(runs_url(1), params={"limit": 100}).json()) == 3


def test_list_filters_by_status(api_client: httpx.Client, db: Engine) -> None:
    failed = insert_run(db, status="failed", created_at=T0)
    insert_run(db, status="success", created_at=T0 + timedelta(seconds=1))
    queued = insert_run(db, status="queued", created_at=T0 + timedelta(seconds=2))

    assert [r["id"] for r in api_client.get(runs_url(1), params={"status": "failed"}).json()] == [
        failed
    ]
    assert [r["id"] for r in api_client.get(runs_url(1), params={"status": "queued"}).json()] == [
        queued
    ]
    assert api_client.get(runs_url(1), params={"status": "running"}).json() == []
    bad = api_client.get(runs_url(1), params={"status": "done"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "status"]


def test_list_pages_with_before_id(api_client: httpx.Client, db: Engine) -> None:
    # Two runs share a created_at: the id breaks the tie, so no run is skipped or repeated.
    ids = [
        insert_run(db, status="success", created_at=T0 + timedelta(seconds=i // 2))
        for i in range(7)
    ]
    seen: list[int] = []
    params: dict[str, Any] = {"limit": 3}
    pages = 0
    while True:
        page = api_client.get(runs_url(1), params=params).json()
        pages += 1
        seen.extend(run["id"] for run in page)
        if len(page) < 3:
            break
        params["before_id"] = page[-1]["id"]

    assert seen == ids[::-1]
    assert pages == 3


def test_list_before_id_of_another_project_is_an_empty_page(
    api_client: httpx.Client, db: Engine
) -> None:
    insert_run(db, created_at=T0, status="success")
    other = insert_run(db, project_id=2, created_at=T0 + timedelta(hours=1))

    assert api_client.get(runs_url(1), params={"before_id": other}).json() == []
    assert api_client.get(runs_url(1), params={"before_id": 999999}).json() == []


# --- authentication and scopes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", runs_url(1)), ("GET", runs_url(1, 1)), ("POST", runs_url(1))],
)
@pytest.mark.parametrize(
    ("headers", "challenge"),
    [
        ({}, "Bearer"),
        ({"Authorization": "Bearer wrong-token"}, 'Bearer error="invalid_token"'),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer"),
        ({"Authorization": "Bearer"}, "Bearer"),
    ],
)
def test_missing_or_wrong_token_is_401_with_a_bearer_challenge(
    api_server: UvicornServer,
    api_enqueue: RecordingEnqueue,
    method: str,
    path: str,
    headers: dict[str, str],
    challenge: str,
) -> None:
    response = httpx.request(
        method,
        api_server.url + path,
        headers=headers,
        json={"job_code": "stocks", "marketplace_code": "demo"} if method == "POST" else None,
    )

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == challenge
    assert api_enqueue.run_ids == []


def test_a_run_of_another_project_is_404_like_a_missing_one(
    api_client: httpx.Client, db: Engine
) -> None:
    other = insert_run(db, project_id=2)

    through_own_project = api_client.get(runs_url(1, other))
    missing = api_client.get(runs_url(1, other + 1000))

    assert through_own_project.status_code == 404
    assert missing.status_code == 404
    assert through_own_project.json()["detail"] == f"run {other} not found in project 1"


def test_a_project_outside_the_tokens_scope_is_404_everywhere(
    api_client: httpx.Client, api_enqueue: RecordingEnqueue, db: Engine
) -> None:
    existing = insert_run(db, project_id=2)

    answers = [
        api_client.get(runs_url(2)),
        api_client.get(runs_url(2, existing)),
        api_client.get(runs_url(2, existing + 1000)),
        api_client.post(runs_url(2), json={"job_code": "stocks", "marketplace_code": "demo"}),
        # Not even validation runs first: a bad body says nothing about the project either.
        api_client.post(runs_url(2), json={}),
    ]

    assert [a.status_code for a in answers] == [404] * 5
    # An existing run and a missing one of that project are indistinguishable.
    assert len({a.text for a in answers}) == 1
    assert api_enqueue.run_ids == []
    with db.connect() as conn:
        assert conn.execute(select(IngestRun.id)).scalars().all() == [existing]


def test_the_star_token_sees_every_project(
    api_server: UvicornServer, api_tokens: ApiTokens, db: Engine
) -> None:
    one = insert_run(db, project_id=1)
    two = insert_run(db, project_id=2)
    with httpx.Client(base_url=api_server.url, headers=bearer(api_tokens.every_project)) as c:
        assert c.get(runs_url(1, one)).status_code == 200
        assert c.get(runs_url(2, two)).status_code == 200
        assert c.get(runs_url(12345)).json() == []
    with httpx.Client(base_url=api_server.url, headers=bearer(api_tokens.project2)) as c:
        assert c.get(runs_url(2, two)).status_code == 200
        assert c.get(runs_url(1, one)).status_code == 404


def test_the_token_never_appears_in_the_logs(
    api_settings: Settings, api_tokens: ApiTokens, caplog: pytest.LogCaptureFixture
) -> None:
    # Every logger at DEBUG, uvicorn's access log included (it does not propagate to the root,
    # so its records are routed to caplog explicitly).
    caplog.set_level(logging.DEBUG)
    uvicorn_loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.access")]
    wrong = "wrong-" + api_tokens.project1[::-1]
    app = create_app(api_settings, enqueue=RecordingEnqueue())
    with UvicornServer(app, log_level="debug") as server:
        for lg in uvicorn_loggers:
            lg.addHandler(caplog.handler)
        try:
            with httpx.Client(base_url=server.url) as c:
                c.post(
                    runs_url(1),
                    json={"job_code": "stocks", "marketplace_code": "demo"},
                    headers=bearer(api_tokens.project1),
                )
                c.get(runs_url(1), headers=bearer(api_tokens.project1))
                c.get(runs_url(2), headers=bearer(api_tokens.project1))
                c.get(runs_url(1), headers=bearer(wrong))
        finally:
            for lg in uvicorn_loggers:
                lg.removeHandler(caplog.handler)

    assert "Run 1 queued" in caplog.text  # the capture did see the requests
    assert any("GET /api/v1/projects/1/ingest/runs" in r.getMessage() for r in caplog.records)
    for secret in (api_tokens.project1, wrong, api_tokens.every_project):
        assert secret not in caplog.text
        assert all(secret not in r.getMessage() for r in caplog.records)


# --- enqueue failures, health, OpenAPI -------------------------------------------------------


def test_post_with_the_broker_down_fails_the_run_and_answers_503(
    api_settings: Settings, api_tokens: ApiTokens, db: Engine
) -> None:
    # The real default enqueue (CeleryEnqueue) against a port nothing listens on.
    settings = api_settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{closed_port()}/0"}
    )
    with (
        UvicornServer(create_app(settings)) as server,
        httpx.Client(
            base_url=server.url, headers=bearer(api_tokens.project1), timeout=30
        ) as client,
    ):
        began = time.monotonic()
        response = client.post(
            runs_url(1), json={"job_code": "frontend_prices", "marketplace_code": "demo"}
        )
        elapsed = time.monotonic() - began

    assert response.status_code == 503, response.text
    assert "broker was unreachable" in response.json()["detail"]
    assert elapsed < 5, f"the failed enqueue took {elapsed:.1f} s"
    with db.connect() as conn:
        [run_id] = conn.execute(select(IngestRun.id)).scalars().all()
    row = read_run(db, run_id)
    assert row.status == "failed"
    assert row.finished_at is not None
    assert row.error_message.startswith("enqueue failed: the broker was unreachable")
    assert row.celery_task_id is None


def test_post_with_the_default_enqueue_publishes_to_the_configured_broker(
    api_settings: Settings, api_tokens: ApiTokens, redis_url: str, db: Engine
) -> None:
    # The real CeleryEnqueue, no worker: the message must wait in the Redis of *these*
    # settings (not the broker the Celery app was imported with), carrying the run id.
    with (
        UvicornServer(create_app(api_settings)) as server,
        httpx.Client(base_url=server.url, headers=bearer(api_tokens.project1)) as client,
    ):
        response = client.post(runs_url(1), json={"job_code": "stocks", "marketplace_code": "q"})

    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    task_id = read_run(db, run_id).celery_task_id
    assert task_id
    broker = redis.Redis.from_url(redis_url)
    try:
        messages = [json.loads(raw) for raw in broker.lrange("celery", 0, -1)]
        ours = [m for m in messages if m["headers"]["id"] == task_id]
        assert len(ours) == 1, messages
        assert ours[0]["headers"]["task"] == "app.tasks.ingest.execute_ingest"
        assert ours[0]["headers"]["argsrepr"] == f"[{run_id}]"
    finally:
        for raw in broker.lrange("celery", 0, -1):
            if json.loads(raw)["headers"]["id"] == task_id:
                broker.lrem("celery", 1, raw)
        broker.close()


def test_healthz_ok_when_database_and_broker_answer(api_client: httpx.Client) -> None:
    response = api_client.get("/healthz", headers={"Authorization": ""})

    assert response.status_code == 200
    assert response.json() == {"database": "ok", "broker": "ok"}


@pytest.mark.parametrize("down", ["broker", "database"])
def test_healthz_503_when_a_dependency_is_down(api_settings: Settings, down: str) -> None:
    port = closed_port()
    if down == "broker":
        settings = api_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0"})
    else:
        settings = api_settings.model_copy(
            update={"database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{port}/none"}
        )
    with UvicornServer(create_app(settings, enqueue=RecordingEnqueue())) as server:
        began = time.monotonic()
        response = httpx.get(f"{server.url}/healthz", timeout=30)
        elapsed = time.monotonic() - began

    assert response.status_code == 503
    body = response.json()
    up = "database" if down == "broker" else "broker"
    assert body[up] == "ok"
    assert body[down].startswith("error: "), body
    assert "refused" in body[down].lower(), body
    assert elapsed < 5


def test_database_down_on_a_request_is_503(api_settings: Settings, api_tokens: ApiTokens) -> None:
    settings = api_settings.model_copy(
        update={"database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{closed_port()}/x"}
    )
    with UvicornServer(create_app(settings, enqueue=RecordingEnqueue())) as server:
        response = httpx.get(server.url + runs_url(1), headers=bearer(api_tokens.project1))

    assert response.status_code == 503
    assert response.json()["detail"].startswith("the database did not answer")


def test_openapi_declares_the_paths_and_the_bearer_scheme(api_client: httpx.Client) -> None:
    response = httpx.get(f"{api_client.base_url}/openapi.json")

    assert response.status_code == 200
    schema = response.json()
    assert set(schema["paths"]) == {
        "/api/v1/projects/{project_id}/ingest/runs",
        "/api/v1/projects/{project_id}/ingest/runs/{run_id}",
        "/healthz",
    }
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    runs = schema["paths"]["/api/v1/projects/{project_id}/ingest/runs"]
    for operation in (runs["get"], runs["post"]):
        assert operation["security"] == [{"bearerAuth": []}]
        assert {"401", "404", "422"} <= set(operation["responses"])
    assert {"202", "409", "503"} <= set(runs["post"]["responses"])
    job_code = schema["components"]["schemas"]["RunCreate"]["properties"]["job_code"]
    assert job_code["enum"] == list(job_codes())
    assert "security" not in schema["paths"]["/healthz"]["get"]
    # Swagger UI would load its scripts from a CDN: it is off, the document is the interface.
    assert httpx.get(f"{api_client.base_url}/docs").status_code == 404


def test_bad_token_configuration_fails_at_startup(clean_db: str) -> None:
    with pytest.raises(ValueError, match="APP_API_TOKENS"):
        create_app(Settings(database_url=clean_db, api_tokens="no-equals-sign"))
