"""The async work of one report: sections built concurrently, then summed."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["SECTIONS", "build_report", "expected_result"]

SECTIONS = 4


async def _section(tenant: str, kind: str, index: int) -> int:
    await asyncio.sleep(0.005)  # a query, an HTTP call: something that yields to the loop
    return len(tenant) * 100 + len(kind) * 10 + index


async def build_report(tenant: str, kind: str) -> dict[str, Any]:
    if kind == "broken":
        raise ValueError(f"report kind {kind!r} has no template")
    values = await asyncio.gather(*(_section(tenant, kind, i) for i in range(SECTIONS)))
    return {"tenant": tenant, "kind": kind, "sections": SECTIONS, "total": sum(values)}


def expected_result(tenant: str, kind: str) -> dict[str, Any]:
    """What :func:`build_report` returns, computed without a loop (for the scenarios)."""
    total = sum(len(tenant) * 100 + len(kind) * 10 + i for i in range(SECTIONS))
    return {"tenant": tenant, "kind": kind, "sections": SECTIONS, "total": total}
