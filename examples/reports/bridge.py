"""Run a coroutine from the synchronous task: ``asyncio.run`` when this thread runs no loop, a
fresh loop on a thread of its own when one runs (the same pattern as the ingestion service's
``run_async_safe``, written another way)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_coro"]

T = TypeVar("T")

logger = logging.getLogger("examples.reports.bridge")


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_coro(coro: Coroutine[Any, Any, T], label: str) -> T:
    """The coroutine's result; ``label`` names the caller's work in the bridge's log line."""
    running = _loop_running()
    logger.info(
        "bridge: loop_running=%s, via %s [%s]", running, "thread" if running else "run", label
    )
    if not running:
        return asyncio.run(coro)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # handed to the caller's thread below
            error.append(exc)

    # A real OS thread: its own thread state, so asyncio sees no running loop there.
    thread = threading.Thread(target=target, name=f"bridge-{label}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
