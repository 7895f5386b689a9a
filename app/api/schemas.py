"""The API's JSON shapes: the runbook's run object, the request to start a run, health, errors.

Times are ISO 8601 in UTC with a ``Z`` suffix and always six fractional digits
(``2026-01-27T10:00:00.123456Z``): the database keeps microseconds, and rendering them all,
at a fixed width, lets a client compare the API with the row exactly and sort the strings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
)

from app.ingest import job_codes
from app.models import MAX_BIGINT, MAX_INT

__all__ = [
    "MAX_BIGINT",
    "MAX_INT",
    "ErrorOut",
    "HealthOut",
    "RunCreate",
    "RunOut",
    "RunStatus",
    "format_utc",
]

# Path and query ids are bounded by their column types (app.models): a larger number would
# reach Postgres and fail there ("integer out of range") as a 500 instead of a clear 422.

RunStatus = Literal["queued", "running", "success", "failed"]

# Marketplace codes are short identifiers ("demo", "wb"); restricting the alphabet also keeps
# NUL bytes and other text Postgres refuses from ever reaching the database.
MARKETPLACE_CODE_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def format_utc(value: datetime) -> str:
    """``2026-01-27T10:00:00.123456Z``: UTC, fixed width, the ``Z`` the runbook shows."""
    if value.tzinfo is None:
        # timestamptz columns always come back aware; a naive value is a programming error.
        raise ValueError(f"refusing to render a naive datetime as UTC: {value!r}")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


UtcTimestamp = Annotated[
    datetime,
    PlainSerializer(format_utc, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$",
            "examples": ["2026-01-27T10:00:00.000000Z"],
        },
        mode="serialization",
    ),
]


class RunOut(BaseModel):
    """One ingestion run: the runbook's object (first seven keys) plus where it belongs."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 123,
                    "status": "success",
                    "started_at": "2026-01-27T10:00:00.000000Z",
                    "finished_at": "2026-01-27T10:05:00.000000Z",
                    "duration_ms": 300000,
                    "stats_json": {"ok": True, "project_id": 1, "domain": "frontend_prices"},
                    "error_message": None,
                    "project_id": 1,
                    "marketplace_code": "demo",
                    "job_code": "frontend_prices",
                    "created_at": "2026-01-27T09:59:59.500000Z",
                }
            ]
        }
    )

    id: int
    status: RunStatus
    started_at: UtcTimestamp | None
    finished_at: UtcTimestamp | None
    duration_ms: int | None
    stats_json: dict[str, Any] | None
    error_message: str | None
    project_id: int
    marketplace_code: str
    job_code: str
    created_at: UtcTimestamp


def _job_code_enum(schema: dict[str, Any]) -> None:
    # Computed when the OpenAPI document is built, not at import: the job registry imports the
    # job modules. Declaring the enum lets clients (and schemathesis) send codes that exist.
    schema["enum"] = list(job_codes())


class RunCreate(BaseModel):
    """The request to start a run: which job, on which marketplace (the project is in the path)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"job_code": "frontend_prices", "marketplace_code": "demo"}]
        },
    )

    job_code: Annotated[
        str,
        Field(
            description="One of the job codes the service knows.", json_schema_extra=_job_code_enum
        ),
    ]
    marketplace_code: Annotated[
        str,
        Field(
            pattern=MARKETPLACE_CODE_PATTERN,
            description="Letters, digits, '_', '.', '-'; 1 to 64 characters.",
        ),
    ]

    @field_validator("job_code")
    @classmethod
    def _known_job_code(cls, value: str) -> str:
        codes = job_codes()
        if value not in codes:
            # repr() keeps odd input (control characters, very long text) readable and bounded.
            shown = repr(value) if len(value) <= 80 else repr(value[:80]) + "..."
            raise ValueError(f"unknown job_code {shown}; known job codes: {', '.join(codes)}")
        return value


class ErrorOut(BaseModel):
    """Every error but validation (422): a sentence saying what is wrong."""

    detail: str


class HealthOut(BaseModel):
    """``ok`` or ``error: <why>`` for each dependency."""

    database: str
    broker: str
