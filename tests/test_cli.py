"""Tests of the `harness` command: option errors, the services wiring, and end-to-end runs of
`harness matrix` / `harness flake` against tiny scenarios in a temp dir (no servers needed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest

from harness.matrix import cli
from harness.matrix.report import MatrixCollector
from harness.services import DockerImages, ProbeResult, Services, ServicesUnavailable

CONFTEST = """\
import pytest

@pytest.fixture
def matrix_cell(request, record_property):
    mode, pool, broker = request.param
    record_property("matrix_cell", f"{mode}|{pool}|{broker}")
    return request.param
"""

SCENARIOS = """\
import os
import pytest

def test_success(matrix_cell, record_property):
    record_property("run_duration_ms", 40)
    record_property("run_duration_ms", 60)

def test_maybe_fails(matrix_cell, record_property):
    record_property("run_duration_ms", 100)
    if matrix_cell[1] == os.environ.get("FAIL_POOL"):
        raise AssertionError(f"run ended 'failed' in {matrix_cell[1]}")
"""

# A scenario that fails in one run only: each session counts itself in a file next to the tests.
FLAKY_CONFTEST = """\
from pathlib import Path

def pytest_sessionstart(session):
    counter = Path(__file__).with_name("runs.txt")
    counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
"""

FLAKY_SCENARIO = """\
from pathlib import Path

def test_flaky(matrix_cell):
    run = int(Path(__file__).with_name("runs.txt").read_text())
    if run == 2 and matrix_cell[1] == "solo":
        raise AssertionError("lost the race in run 2")
"""

CELLS = ["--loop-mode=no_loop,in_process", "--pool=prefork,solo", "--broker=redis"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory with an ini (so pytest's rootdir stops here) and a `sc/` scenarios dir."""
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    scenarios = tmp_path / "sc"
    scenarios.mkdir()
    (scenarios / "conftest.py").write_text(CONFTEST)
    (scenarios / "test_scenarios.py").write_text(SCENARIOS)
    return tmp_path


def clean_env() -> dict[str, str]:
    """This environment without the outer session's pytest/xdist/harness settings (and no CI
    step summary of the outer run's)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "HARNESS_")) and k != "GITHUB_STEP_SUMMARY"
    }


def harness(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env={**clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def matrix_args(*extra: str) -> list[str]:
    return [
        "matrix",
        "--no-services",
        "--services=external",
        "--scenarios=sc",
        "-n",
        "0",
        *CELLS,
        *extra,
    ]


# -- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["matrix", "--pool", "bogus"], "--pool: unknown value(s) 'bogus'; choose from prefork"),
        (["matrix", "--loop-mode", "sideways"], "--loop-mode: unknown value(s) 'sideways'"),
        (["flake", "--broker", "kafka"], "--broker: unknown value(s) 'kafka'"),
        (["matrix", "--services", "cloud"], "--services: unknown value 'cloud'; choose from"),
        (["matrix", "-n", "many"], "'many' is not a worker count; use a number"),
        (["flake", "--runs", "0"], "--runs: 0 is not a number of runs; use 1 or more"),
        (["matrix", "--scenarios", "nowhere"], "run from the project root or pass --scenarios"),
    ],
)
def test_bad_option_exits_2_naming_the_fix(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scenarios").mkdir()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"harness {args[0]}: error: ")
    assert message in err


def test_argparse_errors_and_help_return_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["matrix", "--nope"]) == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["matrix", "--help"]) == 0
    assert '"median_run_ms"' in capsys.readouterr().out


def test_options_come_after_the_cells_and_before_passthrough(tmp_path: Path) -> None:
    (tmp_path / "sc").mkdir()
    opts = cli.parse_options(
        [
            "matrix",
            f"--scenarios={tmp_path / 'sc'}",
            "-n",
            "0",
            "-k",
            "success",
            "--pool=solo",
            "--",
            "-x",
            "-m",
            "matrix and not slow",
        ]
    )
    args = cli.pytest_arguments(opts, services_started=True)
    assert args[0] == str(tmp_path / "sc")
    assert "--services=external" in args
    assert "--pool=solo" in args
    assert (
        "--loop-mode=no_loop,idle_loop,closed_loop,inherited_loop,running_loop,running_uvloop,in_process"
        in args
    )
    assert "-n" not in args  # -n 0: no xdist at all
    assert args[-5:] == ["-k", "success", "-x", "-m", "matrix and not slow"]


# -- services wiring (in process, with a fake stack and a fake pytest) ------------------------

FAKE_SERVICES = Services(
    backend="local",
    postgres_url="postgresql+psycopg2://u:secret@127.0.0.1:5999/ingest",
    postgres_admin_url="postgresql+psycopg2://u:secret@127.0.0.1:5999/postgres",
    redis_url="redis://127.0.0.1:6999/0",
    amqp_url=None,
    postgres_version="15.9",
    redis_version="7.0.15",
)


class FakeStack:
    started: ClassVar[list[str]] = []

    def __init__(self, mode: str, images: DockerImages | None = None) -> None:
        self.mode = mode
        self.images = images

    def __enter__(self) -> Services:
        FakeStack.started.append(self.mode)
        return FAKE_SERVICES

    def __exit__(self, *exc: object) -> None:
        FakeStack.started.append("stopped")


def test_matrix_starts_services_once_and_hands_them_to_pytest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scenarios").mkdir()
    monkeypatch.setenv("HARNESS_AMQP_URL", "amqp://stale")
    monkeypatch.delenv("HARNESS_DATABASE_URL", raising=False)
    FakeStack.started = []
    monkeypatch.setattr(cli, "ServiceStack", FakeStack)
    seen: dict[str, Any] = {}

    def fake_pytest(args: Sequence[str], collector: MatrixCollector, log_path: Path) -> int:
        seen["args"] = list(args)
        seen["env"] = {
            k: os.environ.get(k)
            for k in ("HARNESS_DATABASE_URL", "HARNESS_REDIS_URL", "HARNESS_AMQP_URL")
        }
        nodeid = "scenarios/test_a.py::test_a[in_process]"
        for when in ("setup", "call", "teardown"):
            collector.pytest_runtest_logreport(
                pytest.TestReport(
                    nodeid,
                    ("x", 0, "x"),
                    {},
                    "passed",
                    None,
                    when,  # type: ignore[arg-type]
                )
            )
        return 0

    monkeypatch.setattr(cli, "run_pytest", fake_pytest)
    step_summary = tmp_path / "step-summary.md"
    step_summary.write_text("earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    code = cli.main(["matrix", "--services=local", "--loop-mode=in_process"])

    assert code == 0
    assert FakeStack.started == ["local", "stopped"]
    assert "--services=external" in seen["args"]
    assert seen["env"] == {
        "HARNESS_DATABASE_URL": FAKE_SERVICES.postgres_admin_url,
        "HARNESS_REDIS_URL": FAKE_SERVICES.redis_url,
        "HARNESS_AMQP_URL": None,  # none here: a stale value must not leak into the run
    }
    # Restored afterwards.
    assert os.environ["HARNESS_AMQP_URL"] == "amqp://stale"
    assert "HARNESS_DATABASE_URL" not in os.environ
    out = capsys.readouterr().out
    assert "u:***@127.0.0.1:5999" in out
    assert "secret" not in out
    document = json.loads((tmp_path / "reports" / "matrix.json").read_text())
    assert document["versions"]["postgres"] == "15.9"
    assert document["versions"]["redis"] == "7.0.15"
    assert document["versions"]["celery"]
    assert document["cells"][0]["status"] == "pass"
    # The backend that served the run, in the report and under the table.
    assert document["served_by"] == {
        "backend": "local",
        "postgres": "15.9",
        "redis": "7.0.15",
        "amqp": None,
        "images": {},
    }
    assert "services: local; postgres 15.9; redis 7.0.15" in out
    # The Markdown summary beside the JSON, and appended to CI's step summary.
    markdown = (tmp_path / "reports" / "matrix.md").read_text(encoding="utf-8")
    assert markdown.startswith("## ingest-harness matrix: PASS\n")
    assert "| in_process | ✅ pass 1 · " in markdown
    assert step_summary.read_text(encoding="utf-8") == "earlier step\n" + markdown + "\n"


def test_services_unavailable_exits_2_with_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scenarios").mkdir()

    @contextmanager
    def unavailable(mode: str, images: DockerImages | None = None) -> Iterator[Services]:
        raise ServicesUnavailable(
            "docker", [ProbeResult("docker", False, "no engine answers", "start dockerd")]
        )
        yield FAKE_SERVICES  # pragma: no cover

    monkeypatch.setattr(cli, "ServiceStack", unavailable)
    assert cli.main(["matrix", "--services=docker"]) == 2
    err = capsys.readouterr().err
    assert "The 'docker' service backend is not available." in err
    assert "docker: no engine answers" in err
    assert "start dockerd" in err


# -- end to end (a real pytest session in a subprocess) --------------------------------------


def test_matrix_all_cells_pass(project: Path) -> None:
    proc = harness(project, *matrix_args())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # In process first, then each worker's cells (harness.pytest.plugin._in_worker_order).
    assert "[1/6] in_process" in out
    assert "[3/6] no_loop" in out and "[6/6] no_loop" in out
    assert "loop mode   prefork/redis  solo/redis" in out
    assert "in_process  pass 2 60ms    ·" in out
    assert "matrix: PASS (3 cells: 3 pass)" in out
    document = json.loads((project / "reports" / "matrix.json").read_text())
    assert document["exit_code"] == 0
    assert [
        (c["loop_mode"], c["pool"], c["status"], c["scenarios"], c["median_run_ms"])
        for c in document["cells"]
    ] == [
        ("no_loop", "prefork", "pass", 2, 60.0),
        ("no_loop", "solo", "pass", 2, 60.0),
        ("in_process", "-", "pass", 2, 60.0),
    ]
    assert (project / "reports" / "matrix-pytest.log").read_text().count("passed") >= 1


@pytest.mark.parametrize("workers", ["0", "2"], ids=["no-xdist", "xdist"])
def test_matrix_failing_cell(project: Path, workers: str) -> None:
    proc = harness(
        project, *matrix_args("-n", workers, "--report=out/m.json"), env={"FAIL_POOL": "solo"}
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL 1/2 60ms" in proc.stdout
    assert "AssertionError: run ended 'failed' in solo" in proc.stdout  # under the table
    document = json.loads((project / "out" / "m.json").read_text())
    statuses = {(c["loop_mode"], c["pool"]): c["status"] for c in document["cells"]}
    assert statuses == {
        ("no_loop", "prefork"): "pass",
        ("no_loop", "solo"): "fail",
        ("in_process", "-"): "pass",
    }
    (solo,) = [c for c in document["cells"] if c["pool"] == "solo"]
    assert solo["failures"] == [
        {
            "test": "sc/test_scenarios.py::test_maybe_fails[no_loop-solo-redis]",
            "message": "AssertionError: run ended 'failed' in solo",
        }
    ]
    assert document["exit_code"] == 1


def test_matrix_with_nothing_collected_is_an_error(project: Path) -> None:
    proc = harness(project, *matrix_args("-k", "no_such_test"))
    assert proc.returncode == 2
    assert "no matrix scenario was collected from sc with -k 'no_such_test'" in proc.stdout
    assert "matrix: ERROR" in proc.stdout


def test_flake_reports_every_non_pass_with_run_and_cell(project: Path) -> None:
    (project / "sc" / "test_scenarios.py").unlink()
    (project / "sc" / "conftest.py").write_text(CONFTEST + "\n\n" + FLAKY_CONFTEST)
    (project / "sc" / "test_flaky.py").write_text(FLAKY_SCENARIO)
    proc = harness(project, "flake", "--runs", "2", *matrix_args()[1:])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    runs = [line for line in lines if line.startswith("run ")]
    assert [line.split()[:3] for line in runs] == [["run", "1/2", "pass"], ["run", "2/2", "FAIL"]]
    assert (
        "  run 2  no_loop/solo/redis  sc/test_flaky.py::test_flaky[no_loop-solo-redis]  FAILED"
        in proc.stdout
    )
    document = json.loads((project / "reports" / "flake.json").read_text())
    assert document["exit_code"] == 1
    assert [r["exit_code"] for r in document["run_results"]] == [0, 1]
    (non_pass,) = document["non_passes"]
    assert non_pass == {
        "run": 2,
        "loop_mode": "no_loop",
        "pool": "solo",
        "broker": "redis",
        "test": "sc/test_flaky.py::test_flaky[no_loop-solo-redis]",
        "outcome": "failed",
        "message": "AssertionError: lost the race in run 2",
    }
    assert (project / "reports" / "flake-runs" / "run-02.log").exists()


_HELD_SCENARIO = """
import os, time
from pathlib import Path

def test_held(matrix_cell):
    Path(os.environ["HELD_MARKER"]).touch()
    time.sleep(60)

def test_quick(matrix_cell):
    pass
"""


def test_ctrl_c_in_the_middle_is_interrupted_never_a_pass(tmp_path: Path) -> None:
    """Ctrl-C while a scenario runs: that scenario is ``interrupted`` in the table, the JSON and
    the verdict; the harness exits non-zero."""
    import signal

    from tests._children import sigint_as_in_a_terminal

    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "test_held.py").write_text(_HELD_SCENARIO)
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef matrix_cell(request):\n    return request.param\n"
    )
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\naddopts = -p no:cacheprovider\nasyncio_default_fixture_loop_scope = function\n"
    )
    marker = tmp_path / "held"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HARNESS_"))}
    env["HELD_MARKER"] = str(marker)
    argv = [
        sys.executable, "-m", "harness", "matrix", "--no-services", "--services=external",
        "-n", "0", "--loop-mode=no_loop", "--pool=solo",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "the held scenario never started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert proc.returncode != 0, out
    document = json.loads((tmp_path / "reports" / "matrix.json").read_text())
    outcomes = {t["test"].split("::")[-1].split("[")[0]: t["outcome"] for t in document["tests"]}
    assert outcomes.get("test_held") == "interrupted", out
    (cell,) = document["cells"]
    assert cell["status"] == "interrupted", cell
    progress = [line for line in out.splitlines() if line.startswith("[") and "test_held" in line]
    assert progress and all(" INTERRUPTED " in line for line in progress), out
    assert "matrix: PASS" not in out


def test_n_is_capped_at_what_the_selection_can_use(capsys: pytest.CaptureFixture[str]) -> None:
    one_group = cli.parse_options(["matrix", "-n", "99", "--pool=solo", "--loop-mode=no_loop"])
    assert one_group.numprocesses == "1"
    default = cli.parse_options(["matrix", "-n", "99"])  # 3 pools x redis, and in_process
    assert default.numprocesses == "4"
    err = capsys.readouterr().err
    assert "harness: -n 99 capped to 4: the selection has 4 group(s)" in err
    assert cli.parse_options(["matrix", "-n", "2"]).numprocesses == "2"
    assert cli.parse_options(["matrix", "-n", "0"]).numprocesses == "0"
    assert capsys.readouterr().err == ""


def test_the_default_n_fits_the_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """``-n fit``: in this process for a small matrix, xdist for a large one."""
    assert cli.parse_options(["matrix"]).numprocesses == "0"  # the default 17 cells
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    large = cli.parse_options(["matrix", "--pool=all", "--broker=redis,amqp"])  # 43 cells
    assert large.numprocesses == "2"
    assert cli.parse_options(["matrix", "--pool=all", "-n", "fit"]).numprocesses == "0"  # 22
