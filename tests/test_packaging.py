"""The wheel is the harness alone: no ``app``, ``fixtures`` or ``scripts`` top-level names (they
would clash with other projects'), and the package data the harness reads at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # Built from a copy: an in-tree build leaves build/ and *.egg-info in the checkout. The copy
    # holds every top-level folder, so that a too-wide `packages.find` would show here.
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build")
    for entry in ROOT.iterdir():
        if entry.name in {".venv", ".git", "build", "reports"} or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, src / entry.name, ignore=ignore)
        else:
            shutil.copy2(entry, src / entry.name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_only_the_harness(wheel: zipfile.ZipFile) -> None:
    tops = {
        name.split("/")[0]
        for name in wheel.namelist()
        if not name.split("/")[0].endswith(".dist-info")
    }
    assert tops == {"harness"}
    (top_level,) = [n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["harness"]


def test_the_wheel_ships_the_harness_data_and_its_entry_points(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert {
        "harness/py.typed",
        "harness/data/frontend_prices.json",
        "harness/data/stocks.json",
    } <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "ingest_harness = harness.pytest.plugin" in text
    assert "harness = harness.matrix.cli:main" in text
