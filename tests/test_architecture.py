"""The import contract (pyproject.toml, ``[tool.importlinter]``; docs/architecture.md draws it):
the service never imports its test tool, the harness imports neither the service nor a suite,
and no package has import cycles between its modules. import-linter reads the real import graph
of the tree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = (
    "The service never imports its test tool",
    "The harness imports no app, no test suite and no example",
    "The example app knows only the harness, never the ingestion service",
    "The harness's layers import downwards only",
    "No import cycles between the harness's modules",
)


def test_the_import_contract_holds() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    for name in CONTRACTS:
        assert re.search(rf"^{re.escape(name)} KEPT$", output, re.M), (
            f"contract {name!r} is not kept:\n{output}"
        )
    assert done.returncode == 0, output
