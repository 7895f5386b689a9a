"""The tables: ``ingest_runs`` (one row per ingestion run) and the domain tables the jobs fill."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The largest values of Postgres's INTEGER and BIGINT columns: the bounds of ids in the API
# and the UI.
MAX_INT: Final = 2**31 - 1
MAX_BIGINT: Final = 2**63 - 1

__all__ = [
    "ACTIVE_STATUSES",
    "MAX_BIGINT",
    "MAX_INT",
    "RUN_STATUSES",
    "TERMINAL_STATUSES",
    "Base",
    "FrontendPrice",
    "IngestRun",
    "Stock",
]

RUN_STATUSES: Final = ("queued", "running", "success", "failed")
ACTIVE_STATUSES: Final = ("queued", "running")
TERMINAL_STATUSES: Final = ("success", "failed")

# Stable constraint names, so migrations and error handling can refer to them.
NAMING_CONVENTION: Final = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ACTIVE_RUN_INDEX: Final = "uq_ingest_runs_one_active"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class IngestRun(Base):
    __tablename__ = "ingest_runs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'success', 'failed')", name="status_valid"
        ),
        CheckConstraint("duration_ms IS NULL OR duration_ms >= 0", name="duration_non_negative"),
        # A terminal row always says when it ended and how long it took (migration 0002).
        CheckConstraint(
            "status NOT IN ('success', 'failed') "
            "OR (finished_at IS NOT NULL AND duration_ms IS NOT NULL)",
            name="terminal_rows_complete",
        ),
        # The database, not the application, guarantees one active run per key.
        Index(
            ACTIVE_RUN_INDEX,
            "project_id",
            "marketplace_code",
            "job_code",
            unique=True,
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
        Index("ix_ingest_runs_project_created", "project_id", "created_at"),
        Index("ix_ingest_runs_status_heartbeat", "status", "heartbeat_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(Integer, nullable=False)
    marketplace_code: Mapped[str] = mapped_column(String(64), nullable=False)
    job_code: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="queued")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    # none_as_null: Python None is SQL NULL, never the JSON value null (which IS NULL misses).
    stats_json: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    error_message: Mapped[str | None] = mapped_column(Text)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    celery_task_id: Mapped[str | None] = mapped_column(String(255))

    def __repr__(self) -> str:
        return (
            f"IngestRun(id={self.id}, project_id={self.project_id}, "
            f"job_code={self.job_code!r}, status={self.status!r})"
        )


class FrontendPrice(Base):
    """Storefront prices as the marketplace shows them, one row per product."""

    __tablename__ = "frontend_prices"
    __table_args__ = (UniqueConstraint("project_id", "marketplace_code", "sku"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(Integer, nullable=False)
    marketplace_code: Mapped[str] = mapped_column(String(64), nullable=False)
    sku: Mapped[str] = mapped_column(String(128), nullable=False)
    price: Mapped[Decimal] = mapped_column(Numeric(14, 2), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    discount_price: Mapped[Decimal | None] = mapped_column(Numeric(14, 2))
    observed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class Stock(Base):
    """Stock levels per product and warehouse."""

    __tablename__ = "stocks"
    __table_args__ = (UniqueConstraint("project_id", "marketplace_code", "sku", "warehouse"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(Integer, nullable=False)
    marketplace_code: Mapped[str] = mapped_column(String(64), nullable=False)
    sku: Mapped[str] = mapped_column(String(128), nullable=False)
    warehouse: Mapped[str] = mapped_column(String(64), nullable=False)
    quantity: Mapped[int] = mapped_column(Integer, nullable=False)
    observed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
