"""The CI files a user copies: valid against their published schemas (check-jsonschema's bundled
copies, no network), and saying what the harness and the Makefile actually accept."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.core.pythons import SUPPORTED
from harness.matrix import cli

ROOT = Path(__file__).resolve().parent.parent
GITHUB = ROOT / ".github" / "workflows" / "harness.yml"
GITLAB = ROOT / "docs" / "ci" / "gitlab-ci.yml"
SCHEMAS = {GITHUB: "vendor.github-workflows", GITLAB: "vendor.gitlab-ci"}
# What the CI systems put in place of their variables.
PLACEHOLDERS = {
    "${{ matrix.shard }}": "2",
    "${{ matrix.python }}": "3.12",
    "${SHARD}": "2",
    "${PYTHON}": "3.12",
}


def validate(path: Path, schema: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("path", list(SCHEMAS), ids=["github", "gitlab"])
def test_valid_against_the_published_schema(path: Path) -> None:
    proc = validate(path, SCHEMAS[path])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok -- validation done" in proc.stdout


def test_the_validator_rejects_a_broken_workflow(tmp_path: Path) -> None:
    broken = yaml.safe_load(GITHUB.read_text(encoding="utf-8"))
    del broken["jobs"]["matrix"]["runs-on"]  # a job must say where it runs
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    proc = validate(path, SCHEMAS[GITHUB])
    assert proc.returncode == 1, proc.stdout + proc.stderr


def _commands(document: Any) -> list[str]:
    """Every shell command of the file: GitHub's `run` steps, GitLab's `script` lines."""
    found: list[str] = []
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "run" and isinstance(value, str):
                found.append(value)
            elif key == "script" and isinstance(value, list):
                found.extend(str(line) for line in value)
            else:
                found.extend(_commands(value))
    elif isinstance(document, list):
        for value in document:
            found.extend(_commands(value))
    return found


def _filled(command: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    return " ".join(command.split())


def _make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.MULTILINE))


@pytest.mark.parametrize("path", list(SCHEMAS), ids=["github", "gitlab"])
def test_every_command_is_a_make_target_with_arguments_the_harness_accepts(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # --scenarios is checked relative to the project root
    commands = [_filled(c) for c in _commands(yaml.safe_load(path.read_text(encoding="utf-8")))]
    assert commands
    targets = _make_targets()
    seen = set()
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "make", f"{path.name}: {command!r} does not go through make"
        assert words[1] in targets, f"{path.name}: make {words[1]} is no target of the Makefile"
        seen.add(words[1])
        variables = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        if words[1] == "matrix":
            options = cli.parse_options(["matrix", *shlex.split(variables["MATRIX_ARGS"])])
            assert options.config.shard is not None and str(options.config.shard) == "2/3"
            assert options.report.name == "matrix.json"
        if words[1] == "merge":
            assert {"SHARDS", "MERGE_REPORT"} <= set(variables), command
    assert seen == {"matrix", "merge", "test"}


def test_the_python_versions_are_the_ones_the_harness_supports() -> None:
    github = yaml.safe_load(GITHUB.read_text(encoding="utf-8"))
    for job in ("matrix", "merge"):
        assert tuple(github["jobs"][job]["strategy"]["matrix"]["python"]) == SUPPORTED
    gitlab = yaml.safe_load(GITLAB.read_text(encoding="utf-8"))
    assert tuple(gitlab[".versions"]["PYTHON"]) == SUPPORTED
    assert github["jobs"]["matrix"]["strategy"]["matrix"]["shard"] == [1, 2, 3]
    assert gitlab["matrix"]["parallel"]["matrix"][0]["SHARD"] == ["1", "2", "3"]
