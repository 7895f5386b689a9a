"""The Celery app the harness's worker runs: the Target's own app, tuned for tests, plus the shim.

``celery -A harness.workers.worker_app worker ...`` loads this module instead of the app's own, so
that the app stays unaware of the harness. The app, its task and its runner are the Target's that
``HARNESS_TARGET`` names (harness.core.target). On import it

- applies test tuning (a short broker poll, so a warm shutdown takes a fraction of a second);
- wraps the task's body in :func:`harness.workers.loopmodes.run_in_mode`, the loop mode
  taken per message from the ``harness_loop_mode`` header, else ``HARNESS_DEFAULT_LOOP_MODE``,
  else ``no_loop``; the task's name, options and behaviour are otherwise unchanged;
- with ``HARNESS_RUNNER=prefix``, puts the pre-fix runner (a plain ``asyncio.run``) in place of
  the Target's runner, so the harness can prove it detects the old bug;
- wraps the runner so that a message with the ``harness_job_fault`` header has its job raise
  that fault from inside (:mod:`harness.workers.jobfaults`);
- after each run, logs what the run left behind in the process (:mod:`harness.workers.probe`);
- in a prefork worker (``HARNESS_POOL=prefork``), makes and sets a loop in the parent before
  the pool forks, for the ``inherited_loop`` mode;
- with ``HARNESS_STACKS_FILE``, dumps every thread's stack there on ``SIGUSR2`` (in C, so a
  hung interpreter still answers), for the report of a test that passes its deadline.

Environment (besides the app's own): ``HARNESS_TARGET``, ``HARNESS_DEFAULT_LOOP_MODE``,
``HARNESS_RUNNER`` (``fixed``, the default, or ``prefix``), ``HARNESS_BROKER_POLLING_INTERVAL_S``
(0.1 by default).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import gc
import importlib
import logging
import os
import platform
from collections.abc import Coroutine, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from celery import Celery
from celery.signals import worker_ready

from harness.core.cell import RUNNERS
from harness.core.logs import JOB_FAULT_TEMPLATE, LOOP_MODE_TEMPLATE
from harness.core.target import default_target, resolve
from harness.workers.jobfaults import job_fault_for_request, raising, wrap_runner
from harness.workers.loopmodes import (
    DEFAULT_MODE_ENV,
    POOL_ENV,
    loop_mode_for_request,
    make_parent_loop,
    parse_loop_mode,
    run_in_mode,
)
from harness.workers.probe import Probe
from harness.workers.probe import install as install_probe
from harness.workers.stackdump import dump_stacks_on_signal

__all__ = ["POLLING_INTERVAL_ENV", "RUNNER_ENV", "app", "celery_app", "prefix_run_async_safe"]

T = TypeVar("T")

logger = logging.getLogger("harness.loopmodes")

RUNNER_ENV: Final = "HARNESS_RUNNER"
POLLING_INTERVAL_ENV: Final = "HARNESS_BROKER_POLLING_INTERVAL_S"
# Virtual transports poll their queues; kombu's default of 1 s is what a warm shutdown waits for.
_POLLING_SCHEMES: Final = ("redis", "rediss", "sentinel")
_WAKE_UP_S: Final = 0.1

TARGET = default_target()
celery_app: Celery = resolve(TARGET.celery_app)
# What ``celery -A harness.workers.worker_app`` finds.
app = celery_app


def prefix_run_async_safe(coro: Coroutine[Any, Any, T], *args: Any, **kwargs: Any) -> T:
    """The runner as it was before the fix: ``asyncio.run``, which raises under a running loop.

    It takes whatever else the Target's runner takes (a context, a label) and ignores it. No
    log line, as then. The coroutine is left unawaited when ``asyncio.run`` refuses it, exactly
    as the old code did (Python then warns "coroutine ... was never awaited").
    """
    del args, kwargs
    return asyncio.run(coro)


def _tune(env: Mapping[str, str]) -> None:
    conf = celery_app.conf
    scheme = str(conf.broker_url or "").split("://", 1)[0].split("+", 1)[0]
    if scheme in _POLLING_SCHEMES:
        interval = float(env.get(POLLING_INTERVAL_ENV, "0.1"))
        conf.broker_transport_options = {
            **(conf.broker_transport_options or {}),
            "polling_interval": interval,
        }
    conf.update(
        worker_send_task_events=False,
        task_send_sent_event=False,
        # AMQP heartbeats only add a thread and traffic to a short-lived test worker.
        broker_heartbeat=0,
    )


def _install_runner(env: Mapping[str, str]) -> str:
    runner = env.get(RUNNER_ENV, "").strip() or "fixed"
    if runner not in RUNNERS:
        raise ValueError(f"{RUNNER_ENV}={runner!r} is not one of: {', '.join(RUNNERS)}")
    # The task calls its runner through the module attribute the Target names.
    module_name, attr = TARGET.runner.split(":")
    module = importlib.import_module(module_name)
    if runner == "prefix":
        setattr(module, attr, prefix_run_async_safe)
    # Either runner raises a message's job fault (harness.workers.jobfaults) from inside its job.
    setattr(module, attr, wrap_runner(getattr(module, attr)))
    return runner


def _database_port(env: Mapping[str, str]) -> int | None:
    url = env.get(TARGET.database_url_env, "")
    try:
        return urlsplit(url).port or (5432 if url else None)
    except ValueError:
        return None


def _install_shim(env: Mapping[str, str]) -> None:
    # The app's task modules (its ``include``), then the task object itself from the registry.
    celery_app.loader.import_default_modules()
    task = celery_app.tasks[TARGET.task_name]
    original = task.run  # bound to the task: bind=True gives it ``self``
    install_probe()
    probe = Probe(_database_port(env))

    @functools.wraps(original)
    def run_in_loop_mode(*args: Any, **kwargs: Any) -> Any:
        mode, source = loop_mode_for_request(task.request, env)
        fault = job_fault_for_request(task.request)
        run_id = args[0] if args else kwargs.get("run_id")
        logger.info(LOOP_MODE_TEMPLATE.format(run_id=run_id, mode=mode.value, source=source))
        if fault is not None:
            logger.info(JOB_FAULT_TEMPLATE.format(run_id=run_id, fault=fault.value))
        before = probe.before()
        try:
            with raising(fault):
                return run_in_mode(
                    mode, functools.partial(original, *args, **kwargs), run_id=run_id
                )
        finally:
            logger.info(probe.after(before).line(run_id))

    # Celery's tracer calls ``task.run`` (looked up when the worker builds its tracer, after
    # this import), so an instance attribute replaces the body and nothing else.
    task.run = run_in_loop_mode


def _configure(env: Mapping[str, str]) -> str:
    default = env.get(DEFAULT_MODE_ENV, "").strip()
    if default:
        parse_loop_mode(default)  # a typo fails the worker's start, not every task
    if env.get(POOL_ENV) == "prefork":
        # Before the pool forks, as a preloaded app that made a loop: the inherited_loop mode.
        make_parent_loop()
    _tune(env)
    runner = _install_runner(env)
    _install_shim(env)
    return runner


_RUNNER = _configure(os.environ)
_STACKS_FILE = dump_stacks_on_signal(os.environ)

# The interpreter's last garbage collection walks every object of a process that loaded
# Celery, SQLAlchemy and pydantic: 0.1-0.4 s of every stop. Freezing the heap at exit skips
# that walk; logging.shutdown (also atexit) still flushes and closes the log file.
atexit.register(gc.freeze)


def _noop() -> None:
    pass


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    hub = getattr(sender, "hub", None)
    if hub is not None:
        # The worker's event loop polls with a 1 s timeout when no timer is due and looks at a
        # shutdown request only between polls: with AMQP (Redis has its own poll timer), every
        # warm shutdown waited that second. A short no-op timer caps the poll.
        hub.call_repeatedly(_WAKE_UP_S, _noop)
    # Logged once logging is set up, so the worker's log says how it was configured.
    logger.info(
        "harness worker app: runner=%s, default loop mode=%s, broker polling interval=%s, "
        "Python %s",
        _RUNNER,
        os.environ.get(DEFAULT_MODE_ENV) or "no_loop",
        (celery_app.conf.broker_transport_options or {}).get("polling_interval", "default"),
        platform.python_version(),
    )


# connect() rather than the decorator form: Celery is untyped, and the function stays typed.
worker_ready.connect(_on_worker_ready, weak=False)
