"""The service's log format, shared by the worker, the API and the scripts (the runbook's)."""

from __future__ import annotations

import logging
from typing import Final

__all__ = ["LOG_DATEFMT", "LOG_FORMAT", "configure_logging", "make_formatter"]

LOG_FORMAT: Final = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT: Final = "%Y-%m-%d %H:%M:%S"


def make_formatter() -> logging.Formatter:
    return logging.Formatter(LOG_FORMAT, LOG_DATEFMT)


def configure_logging(level: str | int = "INFO", logger: logging.Logger | None = None) -> None:
    """Give every handler of ``logger`` (root by default) the runbook's format."""
    target = logger or logging.getLogger()
    if not target.handlers:
        target.addHandler(logging.StreamHandler())
    for handler in target.handlers:
        handler.setFormatter(make_formatter())
    target.setLevel(level)
    # One INFO line per HTTP request would bury the runbook's lines in the worker log.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
