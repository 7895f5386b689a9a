"""The broker's side of a fault: messages waiting in a queue, a consumer's unacknowledged
messages in kombu's Redis hash, and waiting until a message is acknowledged."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import kombu.connection
import kombu.entity
import redis

from harness.checks.faults._settings import logger
from harness.checks.faults.waits import wait_for

__all__ = [
    "delete_queue",
    "forget_unacked",
    "message_in_redis",
    "queued_messages",
    "unacked_messages",
    "wait_acknowledged",
]


def _queue_entity(name: str) -> Any:
    # Declared the way Celery declares a missing queue (a direct exchange of the same name).
    entity: Any = kombu.entity  # kombu's Queue and Exchange are untyped
    return entity.Queue(name, entity.Exchange(name, type="direct"), routing_key=name)


def _connection(broker_url: str) -> Any:
    kombu_connection: Any = kombu.connection  # kombu is untyped
    return kombu_connection.Connection(broker_url, connect_timeout=5)


def queued_messages(broker_url: str, queue: str) -> int:
    """How many messages wait in ``queue`` (not counting the ones a worker holds unacked)."""
    with _connection(broker_url) as conn:
        try:
            declared = conn.default_channel.queue_declare(queue=queue, passive=True)
        except conn.channel_errors:
            # NOT_FOUND: on Redis an empty queue is a list that does not exist.
            return 0
        return int(declared.message_count)


def _unacked(client: redis.Redis) -> dict[bytes | str, list[Any]]:
    """kombu's ``unacked`` hash: delivery tag to ``[message, exchange, routing_key]``."""
    return {tag: json.loads(raw) for tag, raw in client.hgetall("unacked").items()}


def _redis_client(broker_url: str) -> redis.Redis:
    return redis.Redis.from_url(broker_url, socket_connect_timeout=5, socket_timeout=5)


def message_in_redis(broker_url: str, queue: str, task_id: str) -> bool:
    """Whether a message of task ``task_id`` is anywhere kombu's Redis transport keeps one:
    waiting in ``queue``'s list, or delivered and unacknowledged in the ``unacked`` hash."""
    client = _redis_client(broker_url)
    try:
        waiting = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
        held = [entry[0] for entry in _unacked(client).values()]
    finally:
        client.close()
    return any((m.get("headers") or {}).get("id") == task_id for m in waiting + held)


def unacked_messages(broker_url: str, queue: str) -> int:
    """How many messages of ``queue`` a consumer took and has not acknowledged (Redis only).

    kombu's Redis transport keeps each delivered, unacknowledged message in the ``unacked``
    hash (as ``[message, exchange, routing_key]``) until its ack; a message still there after
    its worker died is what the visibility timeout redelivers.
    """
    client = _redis_client(broker_url)
    try:
        entries = _unacked(client)
    finally:
        client.close()
    return sum(1 for entry in entries.values() if entry[2] == queue)


def forget_unacked(broker_url: str, queues: Iterable[str]) -> int:
    """Drop the unacknowledged messages of ``queues`` from kombu's Redis tables; how many.

    Only for queues whose workers are gone: it is what their acks would have done.
    """
    names = set(queues)
    client = _redis_client(broker_url)
    try:
        tags = [tag for tag, entry in _unacked(client).items() if entry[2] in names]
        if tags:
            pipe = client.pipeline()
            pipe.hdel("unacked", *tags)
            pipe.zrem("unacked_index", *tags)
            pipe.execute()
    except Exception:  # cleanup never hides what happened before it
        logger.warning("could not forget the unacked messages of %s", sorted(names), exc_info=True)
        return 0
    finally:
        client.close()
    return len(tags)


def wait_acknowledged(broker_url: str, queue: str, *, timeout: float = 10.0) -> None:
    """Wait until no message of ``queue`` is left unacknowledged (nothing to redeliver later).

    Celery logs a task's end before the main process sends the ack, hence a wait.
    """
    wait_for(
        lambda: True if unacked_messages(broker_url, queue) == 0 else None,
        timeout=timeout,
        what=f"every message of {queue} acknowledged",
        describe=lambda: f"{unacked_messages(broker_url, queue)} unacknowledged",
    )


def delete_queue(broker_url: str, queue: str) -> None:
    """Delete ``queue`` and its exchange from the broker; best effort, logged."""
    try:
        with _connection(broker_url) as conn:
            bound = _queue_entity(queue)(conn.default_channel)
            # kombu's virtual transports (Redis) only delete bindings this channel declared.
            bound.declare()
            bound.delete()
            bound.exchange.delete()
    except Exception:  # cleanup never hides what happened before it
        logger.warning("could not delete queue %s", queue, exc_info=True)
