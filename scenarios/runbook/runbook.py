"""The runbook's own text (steps 4 and 5) verbatim, and the checks of the answers it describes.

Copied from ``execute-ingest-runbook.ru.md`` character for character (``test_runbook_e2e``
compares them with the file when it is there), so the scenarios run exactly the query and the
calls a person would paste. Not a test module: the scenarios and ``tests/test_make_run.py``
import it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "ISO_Z",
    "RUNBOOK_FILE_NAME",
    "STEP4_COLUMNS",
    "STEP4_SQL",
    "STEP5_CURL_LIST",
    "STEP5_CURL_RUN",
    "STEP5_KEYS",
    "CurlCall",
    "assert_runbook_run_json",
    "curl_for",
    "find_runbook",
    "parse_curl",
]

RUNBOOK_FILE_NAME: Final = "execute-ingest-runbook.ru.md"

# Step 4, as printed (the comment is the runbook's: it goes to Postgres as it is). The first
# line ends in a space in the runbook too; spelled out so no editor or linter strips it.
STEP4_SQL: Final = (
    "SELECT \n"
    + """\
    id,
    project_id,
    marketplace_code,
    job_code,
    status,
    started_at,
    finished_at,
    duration_ms,
    stats_json,
    error_message
FROM ingest_runs
WHERE id = :run_id  -- замените на актуальный run_id
ORDER BY created_at DESC
LIMIT 1;"""
)
STEP4_COLUMNS: Final = (
    "id",
    "project_id",
    "marketplace_code",
    "job_code",
    "status",
    "started_at",
    "finished_at",
    "duration_ms",
    "stats_json",
    "error_message",
)

# Step 5's two calls, as printed.
STEP5_CURL_LIST: Final = """\
curl -X GET "http://localhost:8000/api/v1/projects/1/ingest/runs?limit=1" \\
  -H "Authorization: Bearer YOUR_TOKEN\""""
STEP5_CURL_RUN: Final = """\
curl -X GET "http://localhost:8000/api/v1/projects/1/ingest/runs/:run_id" \\
  -H "Authorization: Bearer YOUR_TOKEN\""""
# The keys of step 5's expected answer, in its order.
STEP5_KEYS: Final = (
    "id",
    "status",
    "started_at",
    "finished_at",
    "duration_ms",
    "stats_json",
    "error_message",
)
# "2026-01-27T10:00:00Z" in the runbook; the API adds microseconds, which ISO 8601 allows.
ISO_Z: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?Z$")

_CURL: Final = re.compile(r'^curl -X (?P<method>[A-Z]+) "(?P<url>[^"]+)"')
_HEADER: Final = re.compile(r'-H "(?P<name>[^:"]+): (?P<value>[^"]*)"')


def find_runbook(start: Path) -> Path | None:
    """The runbook file, if this checkout sits next to the team's ``shared/spec`` directory."""
    for directory in (start, *start.parents):
        candidate = directory / "shared" / "spec" / RUNBOOK_FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def curl_for(curl: str, *, port: int, token: str, run_id: int | None = None) -> str:
    """A step-5 line as a person fills it in: the port ``make run`` used, the token, the id."""
    filled = curl.replace("localhost:8000", f"localhost:{port}").replace("YOUR_TOKEN", token)
    return filled if run_id is None else filled.replace(":run_id", str(run_id))


@dataclass(frozen=True)
class CurlCall:
    """What a ``curl -X METHOD "URL" -H "Name: value" ...`` line sends."""

    method: str
    url: str
    headers: dict[str, str]


def parse_curl(curl: str) -> CurlCall:
    """The method, URL and headers of one of the runbook's curl lines (backslash-continued)."""
    text = curl.replace("\\\n", " ")
    match = _CURL.match(text.strip())
    if match is None:
        raise ValueError(f'not a `curl -X METHOD "URL"` line: {curl!r}')
    headers = {m["name"]: m["value"] for m in _HEADER.finditer(text)}
    return CurlCall(method=match["method"], url=match["url"], headers=headers)


def assert_runbook_run_json(
    body: Mapping[str, Any],
    *,
    run_id: int,
    status: str = "success",
    project_id: int = 1,
    domain: str = "frontend_prices",
) -> None:
    """Step 5's expected answer: the runbook's keys first, in its order, with its values.

    ``success``: started_at/finished_at ISO with ``Z``, duration_ms set, stats_json with
    ``ok``/``project_id``/``domain``, error_message null. ``failed``: the same times, an
    error_message and no stats.
    """
    problems: list[str] = []
    keys = list(body)[: len(STEP5_KEYS)]
    if keys != list(STEP5_KEYS):
        problems.append(f"the first keys are {keys}, the runbook's are {list(STEP5_KEYS)}")
    if body.get("id") != run_id:
        problems.append(f"id is {body.get('id')!r}, expected {run_id}")
    if body.get("status") != status:
        problems.append(f"status is {body.get('status')!r}, expected {status!r}")
    for key in ("started_at", "finished_at"):
        value = body.get(key)
        if not isinstance(value, str) or not ISO_Z.match(value):
            problems.append(f"{key} is {value!r}, expected ISO 8601 UTC with Z")
    duration = body.get("duration_ms")
    if not isinstance(duration, int) or isinstance(duration, bool) or duration < 0:
        problems.append(f"duration_ms is {duration!r}, expected a number of milliseconds")
    stats = body.get("stats_json")
    if status == "success":
        want = {"ok": True, "project_id": project_id, "domain": domain}
        if not isinstance(stats, dict) or any(stats.get(k) != v for k, v in want.items()):
            problems.append(f"stats_json is {stats!r}, expected at least {want}")
        if body.get("error_message") is not None:
            problems.append(f"error_message is {body.get('error_message')!r}, expected null")
    else:
        if stats is not None:
            problems.append(f"stats_json is {stats!r}, expected null for a failed run")
        if not body.get("error_message"):
            problems.append("error_message is empty, expected the error")
    assert not problems, (
        "the API's run is not the runbook's step 5 answer:\n"
        + "\n".join(f"  - {p}" for p in problems)
        + f"\nbody: {dict(body)!r}"
    )
