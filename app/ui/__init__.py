"""The ingestion page (runbook steps 2 and 6): server-rendered HTML, a little JS over the API."""

from __future__ import annotations

from app.ui.pages import STATIC_DIR, TEMPLATES_DIR, mount_ui

__all__ = ["STATIC_DIR", "TEMPLATES_DIR", "mount_ui"]
