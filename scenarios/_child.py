"""What the scenarios that run `harness matrix` in a child process share: its environment (this
session's servers only) and the parent-death signal, so a killed session leaves no child."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

from harness.services import Services

__all__ = ["ROOT", "child_env", "die_with_us", "run_harness"]

ROOT: Final = Path(__file__).resolve().parent.parent


def die_with_us() -> Callable[[], None] | None:
    """A preexec_fn arming Linux's parent-death signal, so a killed session leaves no child."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)  # we died before it was armed

    return arm


def child_env(services: Services) -> dict[str, str]:
    # Only this session's servers: the child's own pytest makes its database on our cluster.
    # Nothing of ours that would make it think it is an xdist worker or pick other settings.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HARNESS_", "PYTEST_", "APP_", "CELERY_"))
        and k != "GITHUB_STEP_SUMMARY"  # the child's reports are ours to read, not CI's
    }
    env["HARNESS_DATABASE_URL"] = services.postgres_admin_url
    env["HARNESS_REDIS_URL"] = services.redis_url
    if services.amqp_url is not None:
        env["HARNESS_AMQP_URL"] = services.amqp_url
    return env


def run_harness(services: Services, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m harness ARGS`` from the checkout, on this session's servers, its output
    captured; it dies with this process."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=ROOT,
        env=child_env(services),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=die_with_us(),
    )
