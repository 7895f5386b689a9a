"""The service's HTTP API (FastAPI): ingestion runs under ``/api/v1``, ``/healthz``, the UI."""

from __future__ import annotations

from app.api.enqueue import CeleryEnqueue, Enqueue
from app.api.factory import create_app

__all__ = ["CeleryEnqueue", "Enqueue", "create_app"]
