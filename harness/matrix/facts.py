"""What a report says about where it ran: the versions, the backend, the machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any, Final

from harness.core.pythons import PYTHON_ENV
from harness.services import Services

__all__ = ["VERSION_KEYS", "machine", "served_by", "versions"]

#: What a report says ran: the harness's interpreter, the workers' (``--python``), the libraries
#: and the servers.
VERSION_KEYS: Final = (
    "python",
    "worker_python",
    "celery",
    "kombu",
    "sqlalchemy",
    "postgres",
    "redis",
)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(services: Services | None) -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        # --python: the Celery workers' interpreter; else they run on this one.
        "worker_python": os.environ.get(PYTHON_ENV) or platform.python_version(),
        "celery": _package_version("celery"),
        "kombu": _package_version("kombu"),
        "sqlalchemy": _package_version("sqlalchemy"),
        "postgres": services.postgres_version if services else None,
        "redis": services.redis_version if services else None,
    }


def served_by(services: Services | None) -> dict[str, Any] | None:
    """Which backend served the session and what exactly ran there (passwords masked)."""
    if services is None:
        return None
    return {
        "backend": services.backend,
        "postgres": services.postgres_version,
        "redis": services.redis_version,
        "amqp": services.masked().amqp_url,
        "images": dict(services.images),
    }


def machine() -> dict[str, Any]:
    """The machine a run is on, for a report's reader: host, system, cores and load."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "hostname": platform.node(),
        "system": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "load": load,
    }
