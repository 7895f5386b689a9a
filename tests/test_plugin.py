"""The pytest plugin (``harness.pytest.plugin``) end to end, with pytester: options and their ini
pairs, bad values as usage errors that name the fix, the matrix parametrization and its markers, and
failure evidence attached to failed tests only.

No servers: the scenarios' fixtures are replaced by one-line stand-ins in each test's conftest.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from harness.core.cell import pair_from_nodeid
from harness.core.config import ConfigError, HarnessConfig

pytest_plugins = ["pytester"]

# Stand-ins for fixtures/worker.py: the plugin only needs fixtures of these names to exist.
STAND_INS = """
import pytest

@pytest.fixture
def matrix_cell(request):
    return request.param

@pytest.fixture
def worker_pool(request):
    return request.param
"""

# The inner sessions' own ini: quiet about what is not under test here.
BASE_INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
filterwarnings = ignore::pytest.PytestAssertRewriteWarning
"""

CELL_TEST = """
import pytest

def test_cell(matrix_cell):
    pass
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # The outer session's own settings must not reach the inner one.
    for name in ("LOOP_MODE", "POOL", "BROKER", "SERVICES", "RUNNER", "PYTHON", "WORKER_PYTHON"):
        monkeypatch.delenv(f"HARNESS_{name}", raising=False)
    pytester.makeconftest(STAND_INS)
    pytester.makeini(BASE_INI)
    pytester.makepyfile(test_cells=CELL_TEST)
    return pytester


def collected_ids(result: pytest.RunResult) -> list[str]:
    """The parameter ids of the collected items, from ``--collect-only -q`` output."""
    return [
        line.split("[", 1)[1].rstrip("]")
        for line in result.outlines
        if "::" in line and "[" in line
    ]


# -- options, ini, environment ------------------------------------------------------------------


def test_options_and_ini_pairs_are_in_one_group(project: pytest.Pytester) -> None:
    result = project.runpytest("--help")

    text = result.stdout.str()
    assert "ingest-harness matrix:" in text
    for flag in ("--loop-mode", "--pool", "--broker", "--services", "--runner"):
        assert flag in text, flag
    for ini in ("harness_loop_mode", "harness_pool", "harness_broker", "harness_services"):
        assert ini in text, ini
    assert "harness_runner" in text


def test_default_matrix_is_every_loop_mode_on_three_pools_and_redis(
    project: pytest.Pytester,
) -> None:
    result = project.runpytest("--collect-only", "-q")

    ids = collected_ids(result)
    assert len(ids) == 5 * 3 + 1 + 1  # inherited_loop: prefork only
    assert "no_loop-prefork-redis" in ids
    assert "running_uvloop-threads-redis" in ids
    assert "in_process" in ids
    assert not any("gevent" in i or "amqp" in i for i in ids)


def test_ini_values_select_the_cells(project: pytest.Pytester) -> None:
    project.makeini(
        BASE_INI
        + """
harness_loop_mode = idle_loop, in_process
harness_pool = solo
harness_broker = redis,amqp
"""
    )
    result = project.runpytest("--collect-only", "-q")

    # In process first, then each worker's cells (harness.pytest.plugin._in_worker_order).
    assert collected_ids(result) == ["in_process", "idle_loop-solo-redis", "idle_loop-solo-amqp"]


def test_command_line_beats_ini_beats_environment(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARNESS_POOL", "threads")
    monkeypatch.setenv("HARNESS_LOOP_MODE", "no_loop")
    project.makeini(BASE_INI + "harness_pool = solo\n")

    from_ini = collected_ids(project.runpytest("--collect-only", "-q"))
    from_cli = collected_ids(project.runpytest("--collect-only", "-q", "--pool=prefork"))

    assert from_ini == ["no_loop-solo-redis"]  # the pool from ini, the mode from the env
    assert from_cli == ["no_loop-prefork-redis"]


@pytest.mark.parametrize(
    ("args", "fix"),
    [
        (["--pool=prefork,bogus"], "choose from prefork, solo, threads, gevent"),
        (
            ["--loop-mode=spinning"],
            "choose from no_loop, idle_loop, closed_loop, inherited_loop, running_loop",
        ),
        (["--broker=kafka"], "choose from redis, amqp"),
        (["--services=cloud"], "choose from auto, docker, local, external"),
        (["--runner=legacy"], "choose from fixed, prefix"),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_the_fix(
    project: pytest.Pytester, args: list[str], fix: str
) -> None:
    result = project.runpytest(*args)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert fix in result.stderr.str()


def test_a_bad_ini_value_is_a_usage_error_too(project: pytest.Pytester) -> None:
    project.makeini(BASE_INI + "harness_runner = old\n")

    result = project.runpytest()

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    # The error names where the value came from: the ini key the user set.
    assert "harness_runner (ini): unknown value 'old'; choose from fixed, prefix" in (
        result.stderr.str()
    )


def test_runner_resolves_like_the_other_options() -> None:
    def resolve(option: str | None, ini: str | None, env: dict[str, str]) -> str:
        config = HarnessConfig.resolve(
            get_option=lambda name: option if name == "runner" else None,
            get_ini=lambda name: ini if name == "runner" else None,
            env=env,
        )
        return config.runner

    assert resolve(None, None, {}) == "fixed"
    assert resolve(None, None, {"HARNESS_RUNNER": "prefix"}) == "prefix"
    assert resolve(None, "prefix", {"HARNESS_RUNNER": "fixed"}) == "prefix"
    assert resolve("fixed", "prefix", {}) == "fixed"
    with pytest.raises(ConfigError, match="choose from fixed, prefix"):
        HarnessConfig(runner="old")  # type: ignore[arg-type]


# -- markers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expression", "expected"),
    [
        ([], "running_loop and prefork", ["running_loop-prefork-redis"]),
        ([], "in_process", ["in_process"]),
        (
            ["--broker=all", "--loop-mode=running_loop,in_process"],
            "amqp and solo",
            ["running_loop-solo-amqp"],
        ),
        (["--pool=all"], "gevent and running_uvloop", ["running_uvloop-gevent-redis"]),
        (
            ["--pool=solo"],
            "not no_loop and not idle_loop and not closed_loop and not in_process",
            ["running_loop-solo-redis", "running_uvloop-solo-redis"],
        ),
    ],
)
def test_markers_select_cells(
    project: pytest.Pytester, args: list[str], expression: str, expected: list[str]
) -> None:
    result = project.runpytest("--collect-only", "-q", *args, "-m", expression)

    assert collected_ids(result) == expected


def test_every_cell_is_marked_matrix(project: pytest.Pytester) -> None:
    project.makepyfile(test_plain="def test_plain():\n    pass\n")

    result = project.runpytest("-m", "matrix", "-q")

    result.assert_outcomes(passed=17)


def test_matrix_modes_limits_a_scenario_and_deselects_it_when_none_is_left(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_cells="""
        import pytest

        @pytest.mark.matrix(modes=("in_process",))
        def test_in_process_only(matrix_cell):
            assert matrix_cell == ("in_process", "-", "-")
        """
    )

    everything = project.runpytest("-q")
    nothing_left = project.runpytest("-q", "--loop-mode=no_loop")

    everything.assert_outcomes(passed=1)
    nothing_left.assert_outcomes(deselected=1)
    assert "empty parameter set" not in nothing_left.stdout.str()


def test_an_unknown_mode_in_the_matrix_marker_is_a_collection_error(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_cells="""
        import pytest

        @pytest.mark.matrix(modes=("spinning",))
        def test_x(matrix_cell):
            pass
        """
    )

    result = project.runpytest("-q")

    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*matrix(modes=...) has unknown loop mode(s) 'spinning'*"])


def test_worker_pool_is_parametrized_over_pools_and_brokers_with_their_markers(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_cells="""
        def test_pool(worker_pool):
            pass
        """
    )

    every = collected_ids(project.runpytest("--collect-only", "-q", "--broker=all"))
    threads = collected_ids(project.runpytest("--collect-only", "-q", "-m", "threads"))

    # In run order: each worker's tests together, the slow-booting prefork's last.
    assert every == [
        "solo-redis",
        "threads-redis",
        "solo-amqp",
        "threads-amqp",
        "prefork-redis",
        "prefork-amqp",
    ]
    assert threads == ["threads-redis"]


# -- xdist: one worker per (pool, broker) under --dist loadgroup ------------------------------

WHERE_TEST = """
import os
from pathlib import Path

def _note(request, pair):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    out = Path(str(request.config.rootpath)) / "where"
    out.mkdir(exist_ok=True)
    (out / request.node.name).write_text(f"{pair[0]}-{pair[1]} {worker}")

def test_cell(request, matrix_cell):
    if matrix_cell[1] != "-":
        _note(request, matrix_cell[1:])

def test_pool(request, worker_pool):
    _note(request, worker_pool)
"""


def test_loadgroup_sends_each_pools_tests_to_one_xdist_worker(project: pytest.Pytester) -> None:
    """On pytest 9.2 xdist's own loadgroup drops every group (pytest-dev/pytest-xdist#1386):
    without the plugin's scheduler these tests spread over both workers."""
    project.makepyfile(test_cells=WHERE_TEST)

    modes = "--loop-mode=no_loop,idle_loop,running_loop"
    result = project.runpytest_subprocess("-p", "xdist", "-n", "2", "--dist", "loadgroup", modes)

    result.assert_outcomes(passed=3 * 3 + 3)  # 3 worker modes x 3 pools, plus 3 pool tests
    workers_of: dict[str, set[str]] = {}
    for path in (project.path / "where").iterdir():
        pair, worker = path.read_text().split()
        workers_of.setdefault(pair, set()).add(worker)
    assert sorted(workers_of) == ["prefork-redis", "solo-redis", "threads-redis"]
    assert all(len(workers) == 1 for workers in workers_of.values()), workers_of
    # Grouped, yet still parallel: the first two groups go to the two workers.
    assert set().union(*workers_of.values()) == {"gw0", "gw1"}, workers_of


@pytest.mark.parametrize(
    ("nodeid", "pair"),
    [
        ("sc/t.py::test_success[running_uvloop-prefork-redis]", ("prefork", "redis")),
        ("sc/t.py::test_modes_alternate_on_one_worker[threads-amqp]", ("threads", "amqp")),
        ("sc/t.py::test_x[c2-solo-redis-slow]", ("solo", "redis")),
        ("sc/t.py::test_success_in_process[in_process]", None),
        ("sc/t.py::test_load[prefork-c2]", None),
        ("sc/t.py::test_plain", None),
        ("sc/t.py::test_x[redis-solo]", None),
    ],
)
def test_pair_from_nodeid(nodeid: str, pair: tuple[str, str] | None) -> None:
    assert pair_from_nodeid(nodeid) == pair


# -- failure evidence -------------------------------------------------------------------------

EVIDENCE_CONFTEST = (
    STAND_INS
    + """
from harness.pytest.plugin import add_failure_detail, phase_failed

CALLS = []

@pytest.fixture
def evidence(request):
    def detail():
        CALLS.append(request.node.name)
        return ("worker log", "the worker's last lines")
    add_failure_detail(request.node, detail)
    yield
    outcome = "failed" if phase_failed(request.node) else "passed"
    (request.config.rootpath / f"{request.node.name}.outcome").write_text(outcome)

def pytest_sessionfinish(session):
    (session.config.rootpath / "calls").write_text(",".join(CALLS))
"""
)


def test_failure_details_are_attached_to_failures_only(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(EVIDENCE_CONFTEST)
    pytester.makeini(BASE_INI)
    pytester.makepyfile(
        test_evidence="""
        def test_good(evidence):
            pass

        def test_bad(evidence):
            assert 1 == 2
        """
    )

    result = pytester.runpytest("-q", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*- worker log -*", "the worker's last lines"])
    # The detail was called for the failed test only; teardown saw each outcome.
    assert (pytester.path / "calls").read_text() == "test_bad"
    outcomes = {p.stem: p.read_text() for p in pytester.path.glob("*.outcome")}
    assert outcomes == {"test_good": "passed", "test_bad": "failed"}


def test_a_broken_detail_never_hides_the_failure(pytester: pytest.Pytester) -> None:
    pytester.makeini(BASE_INI)
    pytester.makeconftest(
        """
        import pytest
        from harness.pytest.plugin import add_failure_detail

        @pytest.fixture
        def broken(request):
            def detail():
                raise OSError("log file gone")
            add_failure_detail(request.node, detail)
        """
    )
    pytester.makepyfile(
        test_broken="""
        def test_bad(broken):
            assert "row" == "expected row"
        """
    )

    result = pytester.runpytest("-q")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError*",
            "*- harness -*",
            "could not collect failure details: OSError('log file gone')",
        ]
    )


def test_evidence_goes_with_the_first_failed_phase_only(pytester: pytest.Pytester) -> None:
    pytester.makeini(BASE_INI)
    pytester.makeconftest(
        """
        import pytest
        from harness.pytest.plugin import add_failure_detail

        @pytest.fixture
        def breaks_in_teardown(request):
            add_failure_detail(request.node, lambda: ("worker log", "the lines"))
            yield
            raise RuntimeError("teardown broke too")
        """
    )
    pytester.makepyfile(
        test_twice="""
        def test_bad(breaks_in_teardown):
            assert False
        """
    )

    result = pytester.runpytest("-q")

    result.assert_outcomes(failed=1, errors=1)
    sections = [line for line in result.outlines if " worker log " in line and "---" in line]
    assert len(sections) == 1, result.outlines


@pytest.mark.parametrize("mode", ["docker", "compose"])
def test_docker_and_compose_without_an_engine_fail_at_configure_time(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # Short: a unix socket path has a length limit, and pytester's dirs are long.
    socket_path = f"/tmp/ingest-harness-{os.getpid()}-no-engine.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket_path}")

    result = project.runpytest_subprocess(f"--services={mode}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert errors == [
        f"ERROR: --services={mode}: DOCKER_HOST=unix://{socket_path}, and that socket does "
        "not exist. Fix: start the Docker engine (`sudo systemctl start docker`; on a machine "
        "without one, `sudo scripts/docker-engine.sh start` runs a private engine, then "
        "`eval $(scripts/docker-engine.sh env)`), or point DOCKER_HOST at one; or use "
        "--services=local (the installed binaries)"
    ]
    assert "Traceback" not in result.stderr.str()


def test_a_bad_image_names_the_variable_that_set_it(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARNESS_POSTGRES_IMAGE", "Postgres 16")

    result = project.runpytest("--collect-only", "-q")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: HARNESS_POSTGRES_IMAGE: 'Postgres 16' is not a Docker image reference*"]
    )


def test_a_project_that_does_not_use_the_harness_sees_no_trace_of_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outer session names its Target in the environment; this project names none.
    monkeypatch.delenv("HARNESS_TARGET", raising=False)
    for name in ("LOOP_MODE", "POOL", "BROKER", "SERVICES", "RUNNER"):
        monkeypatch.delenv(f"HARNESS_{name}", raising=False)
    pytester.makeini(BASE_INI)
    pytester.makepyfile(test_plain="def test_plain():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "ingest-harness:" not in result.stdout.str()
    # The same project naming a Target gets the harness's header line.
    pytester.makeini(BASE_INI + "harness_target = fixtures.target:INGEST\n")
    named = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    named.assert_outcomes(passed=1)
    assert "ingest-harness: loop modes" in named.stdout.str()


HARNESS_FIXTURES = (
    "harness_target",
    "services",
    "database_url",
    "clean_db",
    "matrix_cell",
    "worker_pool",
    "target_database",
    "target_worker",
)


def test_pytest_fixtures_lists_the_factories_with_their_docs_only_where_a_target_is_named(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HARNESS_TARGET", raising=False)
    pytester.makeini(BASE_INI + "harness_target = examples.reports.target:REPORTS\n")
    named = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--fixtures")
    assert named.ret == 0, named.stderr.str()
    text = named.stdout.str()
    for name in HARNESS_FIXTURES:
        assert re.search(
            rf"^{name}( \[session scope\])? -- .*harness/pytest/fixtures\.py", text, re.M
        ), name
    # With each one's docstring under it.
    assert "a real ``celery worker`` of ``target``" in text
    assert "The Target this session tests" in text
    # A project naming no Target gets none of them.
    pytester.makeini(BASE_INI)
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--fixtures")
    assert plain.ret == 0, plain.stderr.str()
    assert "harness/pytest/fixtures.py" not in plain.stdout.str()
    assert "target_worker" not in plain.stdout.str()


# -- the deadline --------------------------------------------------------------------------------

HANGING_TEST = """
import threading

import pytest


def test_hangs():
    # A helper that waits for its own caller while the caller waits for it: the deadlock a
    # runner makes when its nested call queues behind the call it is nested in.
    release = threading.Event()
    lock = threading.Lock()
    lock.acquire()

    def helper_waits_for_its_caller():
        release.wait()
        lock.release()

    threading.Thread(target=helper_waits_for_its_caller, name="helper", daemon=True).start()
    lock.acquire()


@pytest.mark.deadline(30)
def test_a_marker_gives_more_time():
    import time

    time.sleep(1.5)


def test_the_session_goes_on():
    assert True
"""


def test_a_hang_fails_at_its_deadline_with_every_threads_stack(project: pytest.Pytester) -> None:
    project.makepyfile(test_hang=HANGING_TEST)
    # What a started Celery worker registers (tests/test_worker.py takes a real one's).
    project.makeconftest(
        "from harness.core import stacks\n"
        "stacks.register('Celery worker w1 (pool solo)', lambda: 'STACKS OF W1')\n"
    )
    started = time.monotonic()
    result = project.runpytest_subprocess(
        "test_hang.py", "--harness-deadline=1", "-p", "no:cacheprovider", timeout=120
    )
    took = time.monotonic() - started

    result.assert_outcomes(failed=1, passed=2)
    text = result.stdout.str()
    assert "DeadlineExceeded: test_hang.py::test_hangs (call) passed its 1 s deadline" in text
    assert "--- thread helper" in text and "in helper_waits_for_its_caller" in text
    assert "release.wait()" in text  # what the helper waits on
    assert "lock.acquire()" in text  # and where the test stood
    assert "Stacks of the Celery workers the test process runs:" in text
    assert "=== Celery worker w1 (pool solo)" in text and "STACKS OF W1" in text
    assert took < 30, f"the session took {took:.1f} s"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--harness-deadline=soon"], {}, "--harness-deadline: 'soon' is not a number of seconds"),
        (["--harness-deadline=-1"], {}, "--harness-deadline: '-1' is not a number of seconds"),
        ([], {"HARNESS_DEADLINE_S": "nan"}, "HARNESS_DEADLINE_S: 'nan' is not a number of seconds"),
    ],
)
def test_a_bad_deadline_is_a_usage_error(
    project: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = project.runpytest_subprocess("--collect-only", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


# -- --python ------------------------------------------------------------------------------------


def test_a_python_that_is_not_here_skips_the_worker_cells_with_its_reason(
    project: pytest.Pytester,
) -> None:
    result = project.runpytest("--python=3.99", "-rs")
    # The in_process cell runs on this interpreter; the 16 worker cells are skipped, saying why.
    result.assert_outcomes(passed=1, skipped=16)
    result.stdout.fnmatch_lines(["*no CPython 3.99 here (looked in PATH, pyenv*"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--python=3.x"], "--python: '3.x' is not a list of CPython versions"),
        (["--python=3.11,3.12"], "--python: a pytest session runs its workers on one interpreter"),
    ],
)
def test_a_bad_python_is_a_usage_error(
    project: pytest.Pytester, args: list[str], message: str
) -> None:
    result = project.runpytest_subprocess("--collect-only", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_tests_are_ordered_by_the_worker_they_run_on_within_a_module() -> None:
    """In process first, then each (pool, broker)'s tests together, in first-need order but
    the slow-booting pools' (prefork, gevent) last; the order inside a group and of the tests
    outside the matrix is kept (a stable sort)."""
    from types import SimpleNamespace

    from harness.core.cell import Cell
    from harness.pytest.plugin import _in_worker_order

    one, two = object(), object()

    def item(name: str, module: object, **params: object) -> SimpleNamespace:
        return SimpleNamespace(name=name, module=module, callspec=SimpleNamespace(params=params))

    items = [
        item("a", one, matrix_cell=Cell("no_loop", "prefork", "redis")),
        item("b", one, matrix_cell=Cell("no_loop", "solo", "redis")),
        item("plain", one),
        item("c", one, matrix_cell=Cell("idle_loop", "prefork", "redis")),
        item("d", one, matrix_cell=Cell("in_process")),
        item("e", one, matrix_cell=Cell("idle_loop", "solo", "redis")),
        item("f", two, worker_pool=("threads", "redis")),
        item("g", two, matrix_cell=Cell("no_loop", "threads", "redis")),
    ]
    _in_worker_order(items)  # type: ignore[arg-type]
    assert [i.name for i in items] == ["d", "b", "plain", "e", "a", "c", "f", "g"]
