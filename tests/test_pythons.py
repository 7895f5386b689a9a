"""harness.core.pythons: finding an interpreter, and what a bad --python says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.core.errors import UsageError
from harness.core.pythons import PythonNotFound, find_interpreter, parse_versions, worker_python


def _fake(path: Path, prints: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {prints}\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def test_versions_are_major_minor_and_deduplicated() -> None:
    assert parse_versions("3.11, 3.12,3.11", option="--python") == ("3.11", "3.12")
    for bad in ("3", "3.x", "python3.12", "", "3.12.1"):
        with pytest.raises(UsageError, match=r"--python: .* give them as 3\.11,3\.12,3\.13"):
            parse_versions(bad, option="--python")


def test_found_on_path_then_in_pyenv_and_checked_by_running_it(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "PATH": str(tmp_path / "bin")}
    assert find_interpreter("3.77", env) is None
    pyenv = _fake(tmp_path / ".pyenv/versions/3.77.2/bin/python3.77", "3.77")
    assert find_interpreter("3.77", env) == pyenv
    on_path = _fake(tmp_path / "bin/python3.77", "3.77")
    assert find_interpreter("3.77", env) == on_path  # PATH first
    _fake(on_path, "3.76")  # a python3.77 that is not: skipped for the next one
    assert find_interpreter("3.77", env) == pyenv


def test_a_missing_interpreter_says_where_it_looked(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "PATH": ""}
    with pytest.raises(PythonNotFound, match=r"no CPython 3\.77 here \(looked in PATH, pyenv"):
        worker_python("3.77", root=Path.cwd(), cache=tmp_path / "cache", env=env)
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")
