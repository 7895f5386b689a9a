"""The ``stocks`` job: stock levels per product and warehouse into ``stocks``."""

from __future__ import annotations

from typing import Any, Final

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from app.config import Settings
from app.ingest import JobContext
from app.ingest.base import model_parser, run_domain_job, table_of
from app.models import Stock

__all__ = ["DOMAIN", "StockItem", "run"]

DOMAIN: Final = "stocks"


class StockItem(BaseModel):
    """One item of the marketplace's ``stocks`` pages (limits as in the table)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    sku: str = Field(min_length=1, max_length=128)
    warehouse: str = Field(min_length=1, max_length=64)
    # Strict: "12" or 12.0 would mean the marketplace changed its format, not a quantity.
    quantity: int = Field(strict=True, ge=0, le=2**31 - 1)
    observed_at: AwareDatetime


_PARSE = model_parser(StockItem)


async def run(ctx: JobContext, settings: Settings) -> dict[str, Any]:
    return await run_domain_job(
        ctx,
        settings,
        domain=DOMAIN,
        table=table_of(Stock),
        key_columns=("project_id", "marketplace_code", "sku", "warehouse"),
        parse_item=_PARSE,
    )
