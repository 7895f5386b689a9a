"""Where a hang report finds the stacks of the processes a test drives (its Celery workers).

A process the harness starts that can dump its threads' stacks registers a source here while
it runs (:class:`harness.workers.process.CeleryWorkerProcess` does); when a test passes its
deadline, :mod:`harness.pytest.deadline` asks every live source for its stacks and puts them in
the failure beside the test process's own, so a hang can be read from CI output alone.

This module imports nothing of the harness: every layer may use it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

__all__ = ["collect", "register", "unregister"]

_lock = threading.Lock()
_sources: dict[int, tuple[str, Callable[[], str]]] = {}
_ids = itertools.count(1)


def register(title: str, dump: Callable[[], str]) -> int:
    """Add a source of stacks; returns the token that :func:`unregister` takes."""
    with _lock:
        token = next(_ids)
        _sources[token] = (title, dump)
        return token


def unregister(token: int) -> None:
    with _lock:
        _sources.pop(token, None)


def collect() -> str:
    """Every registered source's stacks, each under its title; a failing source says why."""
    with _lock:
        sources = list(_sources.values())
    blocks = []
    for title, dump in sources:
        try:
            text = dump()
        except Exception as exc:  # a hang report must never fail for want of one source
            text = f"(could not take its stacks: {exc!r})"
        blocks.append(f"=== {title}\n{text.rstrip()}")
    return "\n\n".join(blocks)
