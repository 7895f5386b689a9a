"""A guard around one defect of kombu's Redis transport that took the worker down.

When the broker connection drops while the worker waits for messages (BRPOP) and holds
unacknowledged ones (runs in flight), Celery's consumer collects the connection, which closes
its transport, and then closes the connection. The second close closes the waiting channel again
and tries to hand its unacknowledged messages back, building a new Redis connection pool from
``Channel._connparams``, which reads the closed transport's ``client`` (now ``None``). The
AttributeError that follows is not a connection error, so Celery logs "Unrecoverable error" and
the worker exits (kombu 5.7.0, Celery 5.7.0; reproduced by
``scenarios/faults/test_redis_restart.py``, docs/faults.md, scenario 4).

:func:`install` makes that read raise ``redis.exceptions.ConnectionError`` instead: what it is,
a use of a closed connection. kombu and Celery then ignore it as they ignore every other error
of a connection that is gone, the worker reconnects, and the messages stay unacknowledged in
Redis, where the visibility timeout delivers them again (``APP_BROKER_VISIBILITY_TIMEOUT_S``; a
run that is not queued any more makes that delivery a no-op).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

__all__ = ["install"]

_MARK: Final = "_ingest_closed_transport_guard"


def install() -> bool:
    """Guard ``kombu.transport.redis.Channel._connparams``; True if it is guarded (idempotent).

    False when kombu's Redis transport or redis-py is not importable (an AMQP-only install).
    """
    try:
        import redis.exceptions
        from kombu.transport import redis as kombu_redis
    except ImportError:
        return False
    channel = kombu_redis.Channel
    original: Callable[..., dict[str, Any]] = channel._connparams
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def _connparams(self: Any, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.exceptions.ConnectionError(
                "the broker connection of this channel is closed (its transport has no client)"
            )
        return original(self, asynchronous=asynchronous)

    setattr(_connparams, _MARK, True)
    setattr(channel, "_connparams", _connparams)  # noqa: B010 - mypy forbids assigning a method
    return True
