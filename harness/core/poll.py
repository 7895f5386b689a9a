"""Waiting by deadline, never by a fixed sleep: the one polling loop of the harness."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["poll_until"]

T = TypeVar("T")


def poll_until(
    check: Callable[[], T | None], *, timeout: float, interval: float = 0.01
) -> T | None:
    """Call `check` every `interval` s until it returns non-None, or None after `timeout`.

    `check` raises to abort early (e.g. the server process exited).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)
