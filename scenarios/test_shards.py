"""Sharding on real workers: three shards of the pool=all x broker=redis,amqp matrix, merged by
`harness report merge`, give the cells and outcomes of one unsharded run.

Each run is a `harness matrix` child on this session's Postgres, Redis and RabbitMQ, with the
real Celery workers of every pool; `-k test_success` keeps it to one scenario per cell (every
cell still boots, runs and stops its worker), so the proof costs about a minute, not four.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Final

import pytest

from harness.services import Services
from scenarios._child import run_harness

pytestmark = pytest.mark.integration

CHILD_TIMEOUT_S: Final = 300
SELECTION: Final = ("--loop-mode=all", "--pool=all", "--broker=redis,amqp")


def _harness(services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    return run_harness(services, *args, timeout=CHILD_TIMEOUT_S)


def _matrix(services: Services, report: Path, *extra: str) -> dict[str, Any]:
    proc = _harness(
        services,
        "matrix", "--no-services", "--services=external", *SELECTION, "-n", "0",
        "-k", "test_success", f"--report={report}", *extra,
        "--", "-p", "no:schemathesis", "-p", "no:hypothesispytest", "-p", "no:anyio",
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    document: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    return document


def _outcomes(document: dict[str, Any]) -> tuple[list[tuple[Any, ...]], list[tuple[str, str]]]:
    cells = sorted(
        (c["loop_mode"], c["pool"], c["broker"], c["status"], c["scenarios"])
        for c in document["cells"]
    )
    return cells, sorted((t["test"], t["outcome"]) for t in document["tests"])


def test_three_shards_merged_are_one_unsharded_run(services: Services, tmp_path: Path) -> None:
    if services.amqp_url is None:
        pytest.skip("no RabbitMQ here (HARNESS_AMQP_URL, or one on 127.0.0.1:5672)")
    whole = _matrix(services, tmp_path / "whole" / "matrix.json")
    shards = [
        _matrix(services, tmp_path / f"shard-{k}" / "matrix.json", f"--shard={k}/3")
        for k in (1, 2, 3)
    ]
    # Each shard booted only the workers of its own (pool, broker) groups.
    groups = [{(c["pool"], c["broker"]) for c in shard["cells"]} for shard in shards]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2]), groups
    merged = _harness(
        services, "report", "merge", *(str(tmp_path / f"shard-{k}") for k in (1, 2, 3)),
        f"--report={tmp_path / 'merged' / 'matrix.json'}",
    )  # fmt: skip
    assert merged.returncode == 0, merged.stdout + merged.stderr
    joined = json.loads((tmp_path / "merged" / "matrix.json").read_text(encoding="utf-8"))
    assert _outcomes(joined) == _outcomes(whole)
    assert len(joined["cells"]) == len(whole["cells"]) == 43
    assert sorted(cell for shard in joined["shards"] for cell in shard["cells"]) == sorted(
        f"{c['loop_mode']}/{c['pool']}/{c['broker']}".removesuffix("/-/-") for c in whole["cells"]
    )
    assert "slowest/mean" in merged.stdout
