"""The service's Celery configuration: what it promises about redelivery (unit tests)."""

from __future__ import annotations

import pytest

from app.celery_app import broker_transport_options, celery_app
from app.config import Settings, get_settings


@pytest.mark.parametrize(
    ("timeout", "interval"),
    [(900.0, 10.0), (30.0, 6.0), (5.0, 1.0), (1.0, 1.0)],
)
def test_a_held_message_is_looked_for_every_fifth_of_the_timeout(
    timeout: float, interval: float
) -> None:
    options = broker_transport_options(timeout)
    assert options == {
        "visibility_timeout": timeout,
        "unacked_restore_interval": interval,
        "unacked_restore_throttle": 1,
    }


def test_the_app_redelivers_by_the_setting_and_outlasts_the_hard_time_limit() -> None:
    settings = get_settings()
    options = celery_app.conf.broker_transport_options
    assert options["visibility_timeout"] == settings.broker_visibility_timeout_s
    # A live run's message is not handed out again while its task may still run.
    assert Settings().broker_visibility_timeout_s > Settings().time_limit_s


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_BROKER_VISIBILITY_TIMEOUT_S", "7")
    assert Settings().broker_visibility_timeout_s == 7.0
    monkeypatch.setenv("APP_BROKER_VISIBILITY_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="broker_visibility_timeout_s"):
        Settings()


def test_the_closed_transport_guard_is_installed_once() -> None:
    from kombu.transport import redis as kombu_redis

    from app import broker_fixes

    guarded = kombu_redis.Channel._connparams
    assert broker_fixes.install() is True
    assert kombu_redis.Channel._connparams is guarded, "a second install wrapped it again"
    assert getattr(guarded, "_ingest_closed_transport_guard", False)


def test_a_closed_transport_is_a_connection_error_not_an_attribute_error() -> None:
    import redis.exceptions
    from kombu.transport import redis as kombu_redis

    class _ClosedTransport:
        client = None  # what kombu's Connection.collect() leaves

    channel = object.__new__(kombu_redis.Channel)  # no broker: only the guarded read runs
    channel.connection = _ClosedTransport()
    with pytest.raises(redis.exceptions.ConnectionError, match="connection of this channel is"):
        channel._connparams()
