"""An AMQP URL that does not answer fails its cells in a second, naming it (masked) and the fix,
instead of each scenario waiting 20-45 s for a worker's ping and failing with Celery's banner."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import pytest

from harness.services import Services
from harness.workers.farm import BrokerUnavailable, BrokerUnreachable, WorkerFarm

FAKE = Services(
    backend="external",
    postgres_url="postgresql+psycopg2://u@127.0.0.1:1/db",
    postgres_admin_url="postgresql+psycopg2://u@127.0.0.1:1/postgres",
    redis_url="redis://127.0.0.1:1/0",
    amqp_url=None,
    postgres_version="15",
    redis_version="7",
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _farm(services: Services, tmp_path: Path) -> WorkerFarm:
    return WorkerFarm(
        services, marketplace_url="http://127.0.0.1:1", database_url="x", log_dir=tmp_path
    )


def test_an_amqp_url_that_does_not_answer_fails_at_once_with_the_fix(tmp_path: Path) -> None:
    url = f"amqp://guest:s3cret@127.0.0.1:{_closed_port()}//"
    farm = _farm(dataclasses.replace(FAKE, amqp_url=url), tmp_path)

    began = time.monotonic()
    with pytest.raises(BrokerUnreachable) as info:
        farm.worker("solo", "amqp")
    took = time.monotonic() - began

    message = str(info.value)
    assert took < 5, f"{took:.1f} s to find the broker unreachable"
    assert "the AMQP broker at amqp://guest:***@127.0.0.1:" in message
    assert "s3cret" not in message
    assert "HARNESS_AMQP_URL" in message and "--broker=redis" in message
    # Once decided, the other amqp cells fail as fast, without probing again.
    began = time.monotonic()
    with pytest.raises(BrokerUnreachable):
        farm.worker("threads", "amqp")
    assert time.monotonic() - began < 0.5


def test_no_amqp_url_at_all_is_a_skip_reason_not_a_failure(tmp_path: Path) -> None:
    farm = _farm(FAKE, tmp_path)
    with pytest.raises(BrokerUnavailable, match="set HARNESS_AMQP_URL"):
        farm.worker("solo", "amqp")
