"""The reports CI systems read (JUnit XML, HTML, Markdown), sharding and merging, end to end on
tiny scenarios in a temp dir: real pytest sessions (with and without xdist) and real `harness`
processes; no servers needed. The Chromium check of the HTML on a real pre-fix run is in
scenarios/test_prefix_runner.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from junitparser import Error, Failure, JUnitXml, Skipped

from tests.test_cli import clean_env, harness, matrix_args, project

__all__ = ["project"]  # the fixture, imported for its use here

# A failure with what a worker log holds, an ANSI colour code (not allowed in XML 1.0) among it.
NOISY = """\
import os

def test_noisy(matrix_cell, record_property):
    record_property("run_duration_ms", 25)
    if matrix_cell[1] == os.environ.get("FAIL_POOL"):
        print("[worker] Run 7 failed: \\x1b[31mRuntimeError: boom\\x1b[0m")
        assert {"status": "failed"} == {"status": "success"}

def test_skips(matrix_cell):
    import pytest
    if matrix_cell[0] == "in_process":
        pytest.skip("not in process")
"""


def _write_noisy(project: Path) -> None:
    (project / "sc" / "test_scenarios.py").unlink()
    (project / "sc" / "test_noisy.py").write_text(NOISY)


def _case_properties(path: Path) -> dict[str, dict[str, str]]:
    """testcase name -> its <property> name -> value (junitparser keeps no testcase properties)."""
    found = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        found[str(case.get("name"))] = props
    return found


def _check_junit(path: Path) -> None:
    xml = JUnitXml.fromfile(str(path))  # the parser CI publishing actions use
    cases = {case.name: case for suite in xml for case in suite}
    assert len(cases) == 6, sorted(cases)
    failed = cases["test_noisy[no_loop-solo-redis]"]
    [failure] = failed.result
    assert isinstance(failure, Failure)
    assert failure.message == "AssertionError: assert {'status': 'failed'} == {'status': 'success'}"
    # The whole text, as the terminal shows it: the diff, then the captured worker line.
    assert "Differing items:" in failure.text
    assert "Run 7 failed: \\x1b[31mRuntimeError: boom" in failure.text
    assert failed.classname == "sc.test_noisy"
    assert isinstance(cases["test_skips[in_process]"].result[0], Skipped)
    assert cases["test_noisy[no_loop-prefork-redis]"].is_passed
    props = _case_properties(path)["test_noisy[no_loop-solo-redis]"]
    assert props["loop_mode"] == "no_loop" and props["pool"] == "solo"
    assert props["broker"] == "redis" and props["backend"] == "external"
    assert props["run_duration_ms"] == "25"
    in_process = _case_properties(path)["test_noisy[in_process]"]
    assert "pool" not in in_process and in_process["loop_mode"] == "in_process"
    suite = next(iter(xml))
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (6, 1, 0, 1)


@pytest.mark.parametrize("workers", ["0", "2"], ids=["no-xdist", "xdist"])
def test_matrix_writes_junit_html_and_markdown(project: Path, workers: str) -> None:
    _write_noisy(project)
    proc = harness(
        project,
        *matrix_args("-n", workers, "--report=out/m.json", "--junit=ci/junit.xml"),
        # The plugin's own report variable, set by the user: harness matrix writes once.
        env={"FAIL_POOL": "solo", "HARNESS_REPORT": "twice/m.json"},
    )
    assert not (project / "twice").exists()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    _check_junit(project / "ci" / "junit.xml")
    page = (project / "out" / "m.html").read_text(encoding="utf-8")
    assert 'data-status="fail"' in page and "Differing items:" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    markdown = (project / "out" / "m.md").read_text(encoding="utf-8")
    assert markdown.startswith("## ingest-harness matrix: FAIL")
    assert "reports: out/m.json, ci/junit.xml, out/m.html, out/m.md" in proc.stdout


def test_a_plain_pytest_run_with_the_plugin_writes_the_reports_under_xdist(project: Path) -> None:
    _write_noisy(project)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "sc", "-p", "no:cacheprovider", "-n", "2",
         "--services=external", "--loop-mode=no_loop,in_process", "--pool=prefork,solo",
         "--harness-report=out/m.json"],
        cwd=project, env={**clean_env(), "FAIL_POOL": "solo"}, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # Every property survived xdist: the controller built the report from the workers' reports.
    _check_junit(project / "out" / "m-junit.xml")
    document = json.loads((project / "out" / "m.json").read_text(encoding="utf-8"))
    assert {c["status"] for c in document["cells"]} == {"pass", "fail"}
    assert (project / "out" / "m.html").is_file() and (project / "out" / "m.md").is_file()
    assert "ingest-harness reports: out/m.json, out/m-junit.xml" in proc.stdout


ALL = ["--loop-mode=all", "--pool=all", "--broker=redis,amqp"]


def _outcomes(document: dict[str, object]) -> tuple[list[tuple[str, ...]], list[tuple[str, str]]]:
    cells = sorted(
        (c["loop_mode"], c["pool"], c["broker"], c["status"], str(c["scenarios"]))
        for c in document["cells"]  # type: ignore[attr-defined]
    )
    tests = sorted((t["test"], t["outcome"]) for t in document["tests"])  # type: ignore[attr-defined]
    return cells, tests


def test_three_shards_merged_are_the_unsharded_matrix(project: Path) -> None:
    _write_noisy(project)
    env = {"FAIL_POOL": "gevent"}
    base = ["matrix", "--no-services", "--services=external", "--scenarios=sc", "-n", "0", *ALL]
    whole = harness(project, *base, "--report=whole/matrix.json", env=env)
    assert whole.returncode == 1, whole.stdout + whole.stderr
    for k in (1, 2, 3):
        shard = harness(project, *base, f"--shard={k}/3", f"--report=s{k}/matrix.json", env=env)
        assert shard.returncode in (0, 1), shard.stdout + shard.stderr
        assert f"of shard {k}/3 (of 43 cells)" in shard.stdout
    merged = harness(project, "report", "merge", "s1", "s2", "s3", "--report=merged/matrix.json")
    assert merged.returncode == 1, merged.stdout + merged.stderr
    unsharded = json.loads((project / "whole" / "matrix.json").read_text())
    joined = json.loads((project / "merged" / "matrix.json").read_text())
    assert _outcomes(joined) == _outcomes(unsharded)
    assert len(joined["cells"]) == 43 and joined["exit_code"] == unsharded["exit_code"] == 1
    # Each shard's wall time, and how balanced the split was.
    assert [s["index"] for s in joined["shards"]] == [1, 2, 3]
    assert all(s["wall_s"] > 0 for s in joined["shards"])
    assert "shards: 1/3 " in merged.stdout and "slowest/mean" in merged.stdout
    for name in ("matrix-junit.xml", "matrix.html", "matrix.md"):
        assert (project / "merged" / name).is_file(), name
    cases = [c for suite in JUnitXml.fromfile(str(project / "merged" / "matrix-junit.xml"))
             for c in suite]  # fmt: skip
    assert len(cases) == len(unsharded["tests"])


def test_merge_fails_on_a_missing_shard_and_says_which(project: Path) -> None:
    base = ["matrix", "--no-services", "--services=external", "--scenarios=sc", "-n", "0"]
    for k in (1, 3):
        assert (
            harness(project, *base, f"--shard={k}/3", f"--report=s{k}/matrix.json").returncode == 0
        )
    merged = harness(project, "report", "merge", "s1", "s3")
    assert merged.returncode == 2, merged.stdout + merged.stderr
    assert (
        "shard 2/3 is missing: no report among the inputs; its cells are not run" in merged.stdout
    )
    assert "matrix: ERROR" in merged.stdout
    # Twice the same shard, or a report of another matrix: refused in one line.
    twice = harness(project, "report", "merge", "s1", "s1/matrix.json")
    assert twice.returncode == 2 and "shard 1/3 is there twice" in twice.stderr
    assert harness(project, *base, "--pool=solo", "--report=other/matrix.json").returncode == 0
    other = harness(project, "report", "merge", "s1", "other")
    assert other.returncode == 2
    assert "is not a shard of the same matrix" in other.stderr
    assert "Traceback" not in other.stderr + twice.stderr
    nowhere = harness(project, "report", "merge", "nowhere")
    assert nowhere.returncode == 2
    assert nowhere.stderr.strip() == "harness report: error: nowhere: no such file or directory"


def test_a_shard_that_names_no_shard_is_a_usage_error(project: Path) -> None:
    proc = harness(project, *matrix_args("--shard=4/3"))
    assert proc.returncode == 2
    assert "--shard: '4/3' names no shard; K must be 1 to N" in proc.stderr
    proc = harness(project, *matrix_args("--shard=4/4"))  # CELLS has 3 cells
    assert proc.returncode == 2
    assert "--shard: the selection has 3 cell(s), fewer than 4 shards; use N <= 3" in proc.stderr


def test_flake_writes_junit_per_run_and_a_markdown_summary(project: Path, tmp_path: Path) -> None:
    summary = tmp_path / "step.md"
    proc = harness(
        project, "flake", "--runs", "2", *matrix_args()[1:],
        env={"FAIL_POOL": "solo", "GITHUB_STEP_SUMMARY": str(summary)},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    xml = JUnitXml.fromfile(str(project / "reports" / "flake-junit.xml"))
    assert [suite.name for suite in xml] == ["run 1", "run 2"]
    assert sum(suite.failures for suite in xml) == 2
    markdown = (project / "reports" / "flake.md").read_text(encoding="utf-8")
    assert markdown.startswith("## ingest-harness flake: FAIL")
    assert "| 1 | ❌ |" in markdown and "`no_loop/solo/redis`" in markdown
    # Only the flake's own summary reaches the CI page, not each run's.
    assert summary.read_text(encoding="utf-8") == markdown + "\n"
    assert (project / "reports" / "flake-runs" / "run-01.html").is_file()
    page = (project / "reports" / "flake.html").read_text(encoding="utf-8")
    assert 'href="run-01.html"' not in page  # the runs' pages are in flake-runs/
    assert 'href="flake-runs/run-01.html"' in page and "FAIL" in page


def test_an_error_outside_any_test_is_a_junit_error(project: Path) -> None:
    (project / "sc" / "test_broken.py").write_text("import no_such_module\n")
    proc = harness(project, *matrix_args())
    assert proc.returncode == 2
    xml = JUnitXml.fromfile(str(project / "reports" / "matrix-junit.xml"))
    errors = [c for suite in xml for c in suite if any(isinstance(r, Error) for r in c.result)]
    assert errors and "no_such_module" in errors[0].result[0].text


PLAIN = """\
def test_plain_one():
    pass

def test_plain_two():
    pass

def test_plain_three():
    pass
"""


def _ran(project: Path, *args: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "sc", "-p", "no:cacheprovider", "-q", "-rA",
         "--services=external", *CELLS_ALL, *args],
        cwd=project, env=clean_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PASSED ")}


CELLS_ALL = ["--loop-mode=all", "--pool=prefork,solo,threads"]


def test_the_pytest_option_shards_cells_and_plain_tests_alike(project: Path) -> None:
    (project / "sc" / "test_plain.py").write_text(PLAIN)
    whole = _ran(project)
    parts = [_ran(project, f"--shard={k}/3") for k in (1, 2, 3)]
    assert set().union(*parts) == whole and sum(len(p) for p in parts) == len(whole)
    assert all(parts)
    # A (pool, broker)'s cells stay together: each shard's workers are its own.
    pairs = [{n.split("[")[1].split("-", 1)[1] for n in p if "-redis]" in n} for p in parts]
    assert not (pairs[0] & pairs[1] or pairs[0] & pairs[2] or pairs[1] & pairs[2]), pairs
