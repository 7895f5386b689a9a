"""The fault tools' shared settings: heartbeat, staleness, redelivery, a held source's pace."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final, TypeVar

__all__ = [
    "FAULT_WORKER_APP",
    "HEARTBEAT_INTERVAL_S",
    "HELD_LATENCY_S",
    "REDELIVERY_TRANSPORT_OPTIONS",
    "STALE_AFTER",
    "RowsKey",
]

logger = logging.getLogger("harness.faults")

T = TypeVar("T")

# The app the fault workers run: harness.workers.worker_app plus broker transport options.
FAULT_WORKER_APP: Final = "harness.workers.fault_worker_app"
# A beat every 0.2 s: a killed worker's run looks stale after a second, not after minutes.
HEARTBEAT_INTERVAL_S: Final = 0.2
# What "stale" means in the scenarios: five missed beats. A live worker's heartbeat thread is
# never that late, even on two busy cores; a dead one's run crosses it a second after the kill.
STALE_AFTER: Final = timedelta(seconds=1)
# kombu's Redis transport gives a dead consumer's unacknowledged message to another consumer
# once it is older than visibility_timeout (default 1 h), looking for such messages every
# unacked_restore_interval x unacked_restore_throttle s (default 10 x 10). One second and a
# look every 0.1 s make a redelivery take about a second. Only for workers that run no long
# task themselves: their own messages would be handed out again after a second too.
REDELIVERY_TRANSPORT_OPTIONS: Final[Mapping[str, Any]] = {
    "visibility_timeout": 1,
    "unacked_restore_interval": 0.1,
    "unacked_restore_throttle": 1,
}
# A held source answers each request after this long, so a run keeps fetching (and stays
# running) until release_source(); the request in flight finishes at most this long after it.
HELD_LATENCY_S: Final = 0.25
# The fault workers fetch one page at a time (APP_HTTP_CONCURRENCY=1), so a held run lasts
# pages x latency: 10 s, longer than any scenario holds one, and after the release the rest
# takes ~0.2 s (a page is ~5 ms).
_HELD_PAGES: Final = 40
_HELD_PAGE_SIZE: Final = 5
_POLL_S: Final = 0.01
_LOG_TAIL_LINES: Final = 30

RowsKey = tuple[str, int, str]
"""A domain table's rows of one project and marketplace: (table, project_id, marketplace_code)."""
