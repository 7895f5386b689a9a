"""Property-based checks of the live API against its own ``/openapi.json`` (schemathesis).

Every operation gets valid and invalid requests (bounded, deterministic) with a token that may
see every project; no answer may be a 5xx, and every answer must be declared in the document
(status code and body schema).

Schemathesis' own pytest loader for a schema from a fixture (``schemathesis.pytest
.from_fixture``) fails on this pytest (it sets ``Node._nodeid``, which pytest 9.2 no longer
has), so each operation is a parametrized test that drives schemathesis' strategies with
Hypothesis directly; ``test_every_operation_is_covered`` keeps that list complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import create_engine, insert

from app.models import IngestRun
from fixtures.api import ApiTokens
from harness.workers.http import UvicornServer

MAX_EXAMPLES: Final = 50

CHECKS: Final = [not_a_server_error, response_schema_conformance, status_code_conformance]

OPERATIONS: Final = [
    ("POST", "/api/v1/projects/{project_id}/ingest/runs"),
    ("GET", "/api/v1/projects/{project_id}/ingest/runs"),
    ("GET", "/api/v1/projects/{project_id}/ingest/runs/{run_id}"),
    ("GET", "/healthz"),
]
# /healthz takes no input at all, so there is nothing to make invalid.
WITHOUT_INPUT: Final = {("GET", "/healthz")}
CASES: Final = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or (method, path) not in WITHOUT_INPUT
]


@pytest.fixture
def seeded_runs(clean_db: str) -> Iterator[list[int]]:
    """Runs of project 1 in every state, with the odd values real rows have."""
    t0 = datetime(2026, 1, 27, 10, 0, tzinfo=UTC)
    rows: list[dict[str, Any]] = []
    for i, status in enumerate(["success", "failed", "queued", "running"] * 3):
        started = t0 + timedelta(minutes=i, microseconds=i * 1001) if status != "queued" else None
        finished = (
            started + timedelta(seconds=i) if started and status in ("success", "failed") else None
        )
        rows.append(
            {
                "project_id": 1,
                "marketplace_code": f"m{i}",
                "job_code": "frontend_prices" if i % 2 else "stocks",
                "status": status,
                "created_at": t0 + timedelta(minutes=i // 2),  # pairs share a created_at
                "started_at": started,
                "finished_at": finished,
                "duration_ms": i * 1000 if finished else None,
                "stats_json": {"ok": True, "rows": i, "nested": {"pages": [1, 2]}, "note": "ü"}
                if status == "success"
                else None,
                "error_message": f"ValueError: bad row {i}\nsecond line"
                if status == "failed"
                else None,
            }
        )
    engine = create_engine(clean_db)
    with engine.begin() as conn:
        ids = list(conn.execute(insert(IngestRun).returning(IngestRun.id), rows).scalars())
    engine.dispose()
    yield ids


@pytest.fixture
def api_schema(api_server: UvicornServer) -> Any:
    # An explicit config, so a stray schemathesis.toml cannot change what this test does.
    config = schemathesis.Config.from_dict({"request-timeout": 10})
    return schemathesis.openapi.from_url(f"{api_server.url}/openapi.json", config=config)


def test_every_operation_is_covered(api_schema: Any) -> None:
    live = {
        (result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()
    }
    assert live == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_operation_conforms_to_the_document(
    api_schema: Any, api_tokens: ApiTokens, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]
    headers = {"Authorization": f"Bearer {api_tokens.every_project}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same requests every run: a failure here is reproducible
        database=None,  # nothing written to .hypothesis/
        deadline=None,  # a request's time depends on the machine, not on the input
        suppress_health_check=[HealthCheck.too_slow],
    )
    def check(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    check()


def test_real_runs_conform_to_the_document(
    api_schema: Any, api_tokens: ApiTokens, seeded_runs: list[int]
) -> None:
    # Generated project ids almost never have runs; here the list is fuzzed over one that does
    # (limits, status filters, cursors), and every seeded run is read back once.
    headers = {"Authorization": f"Bearer {api_tokens.every_project}"}
    runs = "/api/v1/projects/{project_id}/ingest/runs"

    @given(case=api_schema[runs]["GET"].as_strategy(path_parameters={"project_id": 1}))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    def check(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    check()
    for run_id in seeded_runs:
        case = api_schema[runs + "/{run_id}"]["GET"].Case(
            path_parameters={"project_id": 1, "run_id": run_id}
        )
        assert case.call_and_validate(headers=headers, checks=CHECKS).status_code == 200
