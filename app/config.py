"""Service settings: the one place that reads the environment (prefix ``APP_``)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "describe_settings_error", "get_settings"]


class Settings(BaseSettings):
    """Configuration of the API, the worker and the jobs.

    ``api_tokens`` is ``token=1,2;other=*``: each token with the project ids it may see
    (``*`` for every project).
    """

    model_config = SettingsConfigDict(env_prefix="APP_", extra="ignore")

    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/ingest"
    broker_url: str = "redis://127.0.0.1:6379/0"
    marketplace_url: str = "http://127.0.0.1:8081"
    api_tokens: str = ""
    # A start request is a few dozen bytes: anything near this is not one.
    api_max_body_bytes: int = Field(default=16384, ge=1024)
    # How long a request waits for the database before it answers 503.
    api_db_timeout_s: float = Field(default=5.0, gt=0)
    log_level: str = "INFO"

    # Jobs: the source client.
    http_timeout_s: float = Field(default=10.0, gt=0)
    http_retries: int = Field(default=3, ge=0)
    http_retry_backoff_s: float = Field(default=0.2, ge=0)
    http_concurrency: int = Field(default=4, ge=1)

    # The task.
    soft_time_limit_s: float = Field(default=600.0, gt=0)
    time_limit_s: float = Field(default=660.0, gt=0)
    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    error_message_max_len: int = Field(default=2000, ge=100)
    # The broker (Redis): a message a worker took and did not acknowledge within this many
    # seconds is delivered again. A worker that loses Redis with messages reserved cannot hand
    # them back, and kombu's default would keep them an hour. The default is above the hard
    # time limit, so a live run's message is not handed out while it runs; a second delivery is
    # harmless anyway, since execute_ingest runs a run only while it is queued.
    broker_visibility_timeout_s: float = Field(default=900.0, ge=1)

    @field_validator("database_url")
    @classmethod
    def _sync_driver(cls, value: str) -> str:
        if not value.startswith("postgresql"):
            raise ValueError(
                f"APP_DATABASE_URL must be a PostgreSQL URL "
                f"(postgresql+psycopg2://user@host:port/db), got scheme {value.split(':', 1)[0]!r}"
            )
        return value

    @property
    def async_database_url(self) -> str:
        """The same database for the async jobs (asyncpg)."""
        scheme, rest = self.database_url.split("://", 1)
        del scheme
        return f"postgresql+asyncpg://{rest}"

    def token_scopes(self) -> dict[str, frozenset[int] | None]:
        """Parse ``api_tokens``: token to its project ids, ``None`` meaning every project."""
        scopes: dict[str, frozenset[int] | None] = {}
        for raw in self.api_tokens.split(";"):
            entry = raw.strip()
            if not entry:
                continue
            token, sep, projects = entry.partition("=")
            token = token.strip()
            if not sep or not token:
                raise ValueError(
                    "APP_API_TOKENS entries look like 'token=1,2' or 'token=*', "
                    f"got an entry without '=' (entry #{len(scopes) + 1})"
                )
            if projects.strip() == "*":
                scopes[token] = None
                continue
            try:
                ids = frozenset(int(p) for p in projects.split(",") if p.strip())
            except ValueError as exc:
                raise ValueError(
                    "APP_API_TOKENS: project ids must be integers or '*' "
                    f"(entry #{len(scopes) + 1})"
                ) from exc
            scopes[token] = ids
        return scopes


def describe_settings_error(exc: ValidationError) -> str:
    """One line naming each ``APP_*`` variable that is wrong and why, never its value (a URL's
    password would be in it)."""
    parts = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        name = f"APP_{field.upper()}" if field else "APP_*"
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(message if message.startswith(name) else f"{name}: {message}")
    return "; ".join(parts) + " (app/config.py lists the settings)"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
