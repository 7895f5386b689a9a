"""The pytest plugin: options with ini pairs, the matrix markers, and the resolved config.

Loaded through the ``pytest11`` entry point, so any project that installs ingest-harness gets it.
Besides the options it parametrizes two fixtures: ``matrix_cell`` over the selected (loop mode,
pool, broker) cells, ``worker_pool`` over the selected (pool, broker) pairs; and it keeps each
test's phase reports in ``item.stash`` so fixtures can attach evidence to a failure only.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import threading
from collections.abc import Generator
from types import FrameType
from typing import Final

import pytest

from harness.core import pythons
from harness.core.cell import (
    BROKERS,
    MATRIX_MODES,
    POOLS,
    RUNNERS,
    SERVICE_MODES,
    SLOW_BOOT_POOLS,
    Cell,
    worker_group,
)
from harness.core.config import ConfigError, HarnessConfig
from harness.core.errors import SetupError, UsageError
from harness.core.shard import Shard
from harness.core.target import TARGET_ENV, TARGET_INI, TargetError, load_target
from harness.matrix.report import without_xdist_group
from harness.pytest import deadline, reports
from harness.pytest.stash import (
    FailureDetail,
    add_failure_detail,
    collect_failure_details,
    harness_config_key,
    phase_failed,
    phase_reports_key,
)
from harness.workers.forkserver import prestart_fork_server

__all__ = [
    "CELL_FIXTURE",
    "POOL_FIXTURE",
    "FailureDetail",
    "NotSelected",
    "add_failure_detail",
    "harness_config_key",
    "phase_failed",
    "phase_reports_key",
]

CELL_FIXTURE: Final = "matrix_cell"
POOL_FIXTURE: Final = "worker_pool"
# pytest-xdist's group of every test that runs on the farm's worker for one (pool, broker):
# under ``--dist loadgroup`` all of them go to one xdist worker, which then boots that Celery
# worker alone (see fixtures/worker.py), rather than every xdist worker booting every pool's.
# The scheduler that makes this hold on pytest 9.2 is harness.pytest.xdist_groups'.


# The interpreter's last garbage collection walks every object of a process that loaded
# pytest, SQLAlchemy, Celery and the app: ~0.5 s of the exit of every pytest process and xdist
# worker, measured, and xdist's controller waits for each worker's. Freezing the heap at exit
# skips that walk, as harness.workers.worker_app does in the Celery workers. Registered on import,
# once per process; freezing only stops the collector, so the handlers that run after it still work.
atexit.register(gc.freeze)


class NotSelected(str):
    """The parameter of a test none of whose cells the options select; it is deselected."""


_OPTIONS: Final = (
    (
        "loop_mode",
        "--loop-mode",
        "loop modes to run, comma-separated or 'all': " + ", ".join(MATRIX_MODES),
    ),
    ("pool", "--pool", "worker pools, comma-separated or 'all': " + ", ".join(POOLS)),
    ("broker", "--broker", "brokers, comma-separated or 'all': " + ", ".join(BROKERS)),
    (
        "shard",
        "--shard",
        "run shard K/N of the selected cells (split by pool and broker where it can; tests "
        "outside the matrix are spread by node id); `harness report merge` joins the reports",
    ),
    (
        "services",
        "--services",
        "where Postgres and Redis come from: "
        + "|".join(SERVICE_MODES)
        + " (auto: docker where an engine answers, else local binaries; compose: the "
        "services of docker-compose.test.yml, after `harness compose up`)",
    ),
    (
        "postgres_image",
        "--postgres-image",
        "the Postgres image of --services=docker (default: postgres:16-alpine; "
        "scripts/docker-engine.sh builds a stand-in where no registry answers)",
    ),
    (
        "redis_image",
        "--redis-image",
        "the Redis image of --services=docker (default: redis:7-alpine)",
    ),
    (
        "runner",
        "--runner",
        "the run_async_safe the workers use: "
        + "|".join(RUNNERS)
        + " (prefix: the pre-fix plain asyncio.run(); the running_* cells must then fail)",
    ),
    (
        "fork_server",
        "--fork-server",
        "on|off: fork the solo, threads and prefork workers from a process that has imported "
        "Celery and the Target's worker_preload (default: on); off: exec each worker",
    ),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ingest-harness", "ingest-harness matrix")
    for name, flag, help_text in _OPTIONS:
        group.addoption(flag, dest=f"harness_{name}", default=None, help=help_text)
        parser.addini(f"harness_{name}", help_text, default=None)
    deadline.add_options(parser)
    reports.add_options(parser)
    python_help = (
        "the CPython version the Celery workers run on, e.g. 3.12, in a venv of their own "
        f"(default: this interpreter; or ${pythons.PYTHON_ENV}); harness matrix --python "
        "3.11,3.12 runs one session per version"
    )
    group.addoption("--python", dest="harness_python", default=None, help=python_help)
    parser.addini("harness_python", python_help, default=None)
    parser.addini(
        TARGET_INI,
        "the harness Target of the Celery app under test: package.module:NAME "
        "(harness.core.target)",
        default=None,
    )


def _set_target(config: pytest.Config) -> None:
    """Check the Target named by HARNESS_TARGET or the ini, and name it in the environment, so
    that every process the session starts (xdist and Celery workers) finds the same one."""
    from_env = os.environ.get(TARGET_ENV, "").strip()
    spec = from_env or str(config.getini(TARGET_INI) or "").strip()
    if not spec:
        return  # a project that does not use the harness's workers
    try:
        target = load_target(spec)
    except TargetError as exc:
        raise pytest.UsageError(f"{TARGET_ENV if from_env else TARGET_INI}: {exc}") from None
    before = {name: os.environ.get(name) for name in (TARGET_ENV, "PYTHONPATH")}
    # The fixtures over a Target: only in a project that names one (``pytest --fixtures``).
    from harness.pytest import fixtures

    if not config.pluginmanager.is_registered(fixtures):
        config.pluginmanager.register(fixtures, "harness-fixtures")
    os.environ[TARGET_ENV] = spec
    # ... and imports it from where this process did (a checkout, through `pythonpath`).
    path = target.pythonpath(spec, os.environ.get("PYTHONPATH"))
    if path:
        os.environ["PYTHONPATH"] = path

    def restore() -> None:  # an in-process pytester session must not leave them to its host
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    config.add_cleanup(restore)


_PYTHON_SKIP: Final = pytest.StashKey[str]()
Pair = tuple[str, str]


def _worker_python(config: pytest.Config) -> None:
    """``--python``: the workers' interpreter, its venv built once; where it is not here, the
    reason their tests are skipped with."""
    sources = (
        ("--python", config.getoption("harness_python")),
        ("harness_python (ini)", config.getini("harness_python")),
        (pythons.PYTHON_ENV, os.environ.get(pythons.PYTHON_ENV)),
    )
    source, value = next(((s, str(v)) for s, v in sources if v not in (None, "")), ("", ""))
    if not value:
        return
    try:
        versions = pythons.parse_versions(value, option=source)
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    if len(versions) != 1:
        raise pytest.UsageError(
            f"{source}: a pytest session runs its workers on one interpreter, got {value!r}; "
            "harness matrix --python 3.11,3.12,3.13 runs one session per version"
        )
    try:
        python = pythons.worker_python(
            versions[0], root=config.rootpath, cache=pythons.default_cache()
        )
    except pythons.PythonNotFound as exc:
        config.stash[_PYTHON_SKIP] = str(exc)
        return
    except SetupError as exc:  # the venv could not be built: its pip output, not a traceback
        raise pytest.UsageError(f"{source}: {exc}") from None
    before = os.environ.get(pythons.WORKER_PYTHON_ENV)
    os.environ[pythons.WORKER_PYTHON_ENV] = str(python)

    def restore() -> None:
        if before is None:
            os.environ.pop(pythons.WORKER_PYTHON_ENV, None)
        else:
            os.environ[pythons.WORKER_PYTHON_ENV] = before

    config.add_cleanup(restore)


def _shard_groups(harness_config: HarnessConfig) -> tuple[set[Pair], set[Pair]]:
    """(the groups this shard boots first, every group of the selection): a test that runs on
    a (pool, broker) worker without being a cell (``worker_pool``) runs in the shard that holds
    that group's first cell, where the worker boots anyway."""
    mine = set(harness_config.cells())
    first: dict[Pair, Cell] = {}
    for cell in harness_config.all_cells():
        if not cell.in_process:
            first.setdefault((cell.pool, cell.broker), cell)
    return {group for group, cell in first.items() if cell in mine}, set(first)


def _in_shard(item: pytest.Item, shard: Shard, owned: set[Pair], groups: set[Pair]) -> bool:
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if isinstance(params.get(CELL_FIXTURE), Cell):
        return True  # generated for this shard's cells only
    pair = _worker_key(item)
    if pair in groups:
        return pair in owned
    # No worker, or a group no cell names: spread by the stable node id (without the
    # "@group" that xdist's loadgroup may already have appended).
    return shard.owns_key(without_xdist_group(item.nodeid))


def _worker_key(item: pytest.Item) -> tuple[str, str] | None:
    """The (pool, broker) whose Celery worker ``item`` runs on; ("", "") for in_process."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    cell = params.get(CELL_FIXTURE)
    if isinstance(cell, Cell):
        return ("", "") if cell.in_process else (cell.pool, cell.broker)
    pair = params.get(POOL_FIXTURE)
    return (str(pair[0]), str(pair[1])) if isinstance(pair, tuple) else None


def _in_worker_order(items: list[pytest.Item]) -> None:
    """Within each module, the tests that need no worker first, then each Celery worker's
    tests together: the quick workers' in the order the module first needs them, then those of
    the pools that are slow to boot (``SLOW_BOOT_POOLS``), in that order too (a stable sort:
    the order within a worker's tests is kept, and so is every test outside the matrix).

    The farm boots the workers in that order, a core's worth at a time: the first tests run
    while the later workers boot (docs/benchmarks.md, issue 14).
    """
    start = 0
    while start < len(items):
        module = getattr(items[start], "module", None)
        end = start
        while end < len(items) and getattr(items[end], "module", None) is module:
            end += 1
        block = items[start:end]
        keys = [_worker_key(item) for item in block]
        rank: dict[tuple[str, str], int] = {("", ""): -1}
        needed = [pair for pair in keys if pair is not None]
        for pair in sorted(needed, key=lambda p: p[0] in SLOW_BOOT_POOLS):
            rank.setdefault(pair, len(rank))
        if len(rank) > 2:  # more than one worker in the module: worth ordering
            # A test outside the matrix keeps the rank of the test before it.
            ranks, last = [], -2
            for key in keys:
                last = rank[key] if key is not None else last
                ranks.append(last)
            order = sorted(range(len(block)), key=lambda i: ranks[i])
            items[start:end] = [block[i] for i in order]
        start = end


def _runs_a_worker(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    cell = callspec.params.get(CELL_FIXTURE) if callspec is not None else None
    if isinstance(cell, Cell):
        return not cell.in_process
    return POOL_FIXTURE in getattr(item, "fixturenames", ())


def _start_deadline(config: pytest.Config) -> None:
    seconds = deadline.configured_deadline(config)
    if seconds == 0 or not deadline.DeadlinePlugin.usable():
        return
    watchdog = deadline.DeadlinePlugin(seconds)
    watchdog.start()
    config.add_cleanup(watchdog.stop)
    config.pluginmanager.register(watchdog, "harness-deadline")


def pytest_configure(config: pytest.Config) -> None:
    for mode in MATRIX_MODES:
        config.addinivalue_line("markers", f"{mode}: matrix cell in loop mode {mode}")
    for pool in POOLS:
        config.addinivalue_line("markers", f"{pool}: matrix cell on the {pool} worker pool")
    for broker in BROKERS:
        config.addinivalue_line("markers", f"{broker}: matrix cell on the {broker} broker")
    config.addinivalue_line(
        "markers",
        "matrix(modes=None): a scenario parametrized over the matrix cells; modes=(...) limits "
        "it to those loop modes (e.g. only in_process for an async def scenario)",
    )
    config.addinivalue_line(
        "markers", "alternating: one worker per pool runs many runs in a row, modes alternating"
    )
    config.addinivalue_line(
        "markers", "integration: needs the real Postgres and Redis started by the harness"
    )
    config.addinivalue_line(
        "markers",
        "deadline(seconds): this test's deadline instead of --harness-deadline's "
        "(harness.pytest.deadline)",
    )
    _start_deadline(config)
    _worker_python(config)
    # pytest-xdist registers it too; here for --strict-markers in a session without xdist.
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist's --dist loadgroup group")
    try:
        harness_config = HarnessConfig.resolve(
            get_option=lambda name: config.getoption(f"harness_{name}"),
            get_ini=lambda name: config.getini(f"harness_{name}"),
        )
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    _check_backend(harness_config)
    _set_target(config)
    config.stash[harness_config_key] = harness_config
    _interrupt_on_sigterm(config)
    reports.register(config, harness_config)


def _check_backend(harness_config: HarnessConfig) -> None:
    """An explicit docker or compose backend that cannot work here is a usage error, now.

    Found at session start it would be an error in every test that uses the services, after
    collection; the probe is one request to the engine's socket.
    """
    if harness_config.services not in ("docker", "compose"):
        return
    from harness.services import probe_compose, probe_docker

    probe = (probe_docker if harness_config.services == "docker" else probe_compose)(
        harness_config.env
    )
    if not probe.ok:
        raise pytest.UsageError(
            f"--services={harness_config.services}: {probe.detail}. Fix: {probe.fix}"
        )


def _interrupt_on_sigterm(config: pytest.Config) -> None:
    """Make SIGTERM (``kill``, a CI timeout) end the session as Ctrl-C does, with its teardown.

    By default SIGTERM kills Python on the spot: the parent-death signal still takes the servers
    and workers down, but no fixture teardown or atexit runs, so their temp dirs stay behind.
    Only where SIGTERM is not handled already, and only from the main thread (signal's rule).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        # Once: a repeated SIGTERM must not interrupt the teardown the first one started
        # (SIGKILL remains the hard stop).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def restore() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, interrupt)
    config.add_cleanup(restore)


def _in_use(config: pytest.Config) -> bool:
    """Whether this project uses the harness: a Target named, or a harness option or ini set."""
    if os.environ.get(TARGET_ENV) or config.getini(TARGET_INI):
        return True
    return any(
        config.getoption(f"harness_{name}") is not None or config.getini(f"harness_{name}")
        for name, _, _ in _OPTIONS
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    # Installed, the plugin loads in every project; one that does not use it sees nothing.
    if not _in_use(config):
        return None
    c = config.stash[harness_config_key]
    return (
        f"ingest-harness: loop modes {','.join(c.loop_modes)}; pools {','.join(c.pools)}; "
        f"brokers {','.join(c.brokers)}; services {c.services}; runner {c.runner}"
        + (
            f"; images {c.postgres_image}, {c.redis_image}"
            if c.services in ("auto", "docker")
            else ""
        )
    )


def _restrict_modes(metafunc: pytest.Metafunc, selected: tuple[str, ...]) -> tuple[str, ...]:
    """The selected loop modes, narrowed by the test's ``@pytest.mark.matrix(modes=...)``."""
    allowed: set[str] | None = None
    for mark in metafunc.definition.iter_markers("matrix"):
        modes = mark.kwargs.get("modes")
        if modes is None:
            continue
        unknown = [m for m in modes if m not in MATRIX_MODES]
        if unknown:
            pytest.fail(
                f"{metafunc.definition.nodeid}: @pytest.mark.matrix(modes=...) has unknown loop "
                f"mode(s) {', '.join(map(repr, unknown))}; known: {', '.join(MATRIX_MODES)}",
                pytrace=False,
            )
        allowed = set(modes) if allowed is None else allowed & set(modes)
    return selected if allowed is None else tuple(m for m in selected if m in allowed)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    harness_config = metafunc.config.stash[harness_config_key]
    if CELL_FIXTURE in metafunc.fixturenames:
        modes = _restrict_modes(metafunc, harness_config.loop_modes)
        params = []
        for cell in harness_config.cells():
            if cell.mode not in modes:
                continue
            marks = [getattr(pytest.mark, cell.mode), pytest.mark.matrix]
            if not cell.in_process:
                marks += [
                    getattr(pytest.mark, cell.pool),
                    getattr(pytest.mark, cell.broker),
                    _worker_group(cell.pool, cell.broker),
                ]
            params.append(pytest.param(cell, id=cell.id, marks=marks))
        _parametrize(metafunc, CELL_FIXTURE, params, "--loop-mode")
    if POOL_FIXTURE in metafunc.fixturenames:
        pairs = [
            pytest.param(
                (pool, broker),
                id=f"{pool}-{broker}",
                marks=[
                    getattr(pytest.mark, pool),
                    getattr(pytest.mark, broker),
                    _worker_group(pool, broker),
                ],
            )
            for broker in harness_config.brokers
            for pool in harness_config.pools
        ]
        _parametrize(metafunc, POOL_FIXTURE, pairs, "--pool/--broker")


def _worker_group(pool: str, broker: str) -> pytest.MarkDecorator:
    return pytest.mark.xdist_group(worker_group(pool, broker))


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadgroup``: xdist's, plus the (pool, broker) groups
    (harness.pytest.xdist_groups)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from harness.pytest.xdist_groups import HarnessGroupScheduling  # only under xdist

    return HarnessGroupScheduling(config, log)


def _parametrize(
    metafunc: pytest.Metafunc, name: str, params: list[pytest.ParameterSet], option: str
) -> None:
    if not params:
        # Nothing of this test is selected: one placeholder that pytest_collection_modifyitems
        # deselects, rather than pytest's skipped "empty parameter set", which reads like a
        # problem.
        params = [pytest.param(NotSelected(f"no cell of it is selected by {option}"), id="-")]
    metafunc.parametrize(name, params, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        (dropped if any(isinstance(p, NotSelected) for p in params) else keep).append(item)
    shard = config.stash[harness_config_key].shard
    if shard is not None:
        # The cells' tests were generated for this shard only; the rest follow it.
        owned, groups = _shard_groups(config.stash[harness_config_key])
        mine = [_in_shard(item, shard, owned, groups) for item in keep]
        dropped += [item for item, ours in zip(keep, mine, strict=True) if not ours]
        keep = [item for item, ours in zip(keep, mine, strict=True) if ours]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    _in_worker_order(items)
    reason = config.stash.get(_PYTHON_SKIP, None)
    if reason is not None:
        for item in items:
            if _runs_a_worker(item):
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the workers' fork server as soon as the session is known to need workers: its
    imports then overlap the services' start (``harness.workers.forkserver``)."""
    config = session.config.stash.get(harness_config_key, None)
    if config is None or not config.fork_server:
        return
    if session.config.stash.get(_PYTHON_SKIP, None) is not None:
        return
    if any(_runs_a_worker(item) for item in session.items):
        with contextlib.suppress(UsageError, OSError):  # the farm reports it, if it recurs
            prestart_fork_server()


# -- failure evidence (harness.pytest.stash) -----------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    collect_failure_details(item, report)
    return report
