"""The ``frontend_prices`` job: the storefront prices of a marketplace into ``frontend_prices``."""

from __future__ import annotations

from typing import Any, Final

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from app.config import Settings
from app.ingest import JobContext
from app.ingest.base import DecimalString, model_parser, run_domain_job, table_of
from app.models import FrontendPrice

__all__ = ["DOMAIN", "PriceItem", "run"]

DOMAIN: Final = "frontend_prices"


class PriceItem(BaseModel):
    """One item of the marketplace's ``frontend_prices`` pages (limits as in the table)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    sku: str = Field(min_length=1, max_length=128)
    price: DecimalString = Field(ge=0, max_digits=14, decimal_places=2)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    discount_price: DecimalString | None = Field(
        default=None, ge=0, max_digits=14, decimal_places=2
    )
    observed_at: AwareDatetime


_PARSE = model_parser(PriceItem)


async def run(ctx: JobContext, settings: Settings) -> dict[str, Any]:
    return await run_domain_job(
        ctx,
        settings,
        domain=DOMAIN,
        table=table_of(FrontendPrice),
        key_columns=("project_id", "marketplace_code", "sku"),
        parse_item=_PARSE,
    )
