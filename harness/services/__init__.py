"""Postgres and Redis (and RabbitMQ by URL) for the tests, behind one interface.

``ServiceStack(mode)`` starts them with one of four backends -- docker (testcontainers),
local (the installed binaries on free loopback ports), external (URLs from the environment),
compose (the running project of docker-compose.test.yml) -- and returns a frozen ``Services``
with their URLs.
"""

from harness.services._admin import create_database, drop_database
from harness.services._base import (
    ProbeResult,
    ServiceMode,
    Services,
    ServicesError,
    ServiceStartError,
    ServicesUnavailable,
    mask_dsn,
)
from harness.services._compose import probe_compose
from harness.services._docker import DockerImages, probe_docker, reap_orphans
from harness.services._local import LocalPostgres, LocalRedis, probe_local
from harness.services._stack import ServiceStack

__all__ = [
    "DockerImages",
    "LocalPostgres",
    "LocalRedis",
    "ProbeResult",
    "ServiceMode",
    "ServiceStack",
    "ServiceStartError",
    "Services",
    "ServicesError",
    "ServicesUnavailable",
    "create_database",
    "drop_database",
    "mask_dsn",
    "probe_compose",
    "probe_docker",
    "probe_local",
    "reap_orphans",
]
