"""``harness report merge DIR...``: the shards of one matrix, put back together.

Each CI job ran ``harness matrix --shard K/N`` and kept its ``reports/``; the merge job fetched
them into directories (or lists the JSON files themselves). The merge reads every shard's
JSON, checks that they are the shards of one matrix (the same selection, runner, N and worker
Python), and writes one table, JSON, JUnit, HTML and Markdown, as an unsharded run would.

It exits 0 only if every shard 1..N is there and every cell passed: a missing shard is an
error (exit 2) and its cells show as not run, a failed shard fails the merge (exit 1). Each
shard's wall time is in the merged report, with how balanced the split was.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.errors import UsageError
from harness.core.shard import Shard
from harness.matrix.report import MatrixResult

__all__ = ["MergeError", "MergedShards", "find_reports", "merge"]


class MergeError(UsageError):
    """The inputs are not the shards of one matrix; the message says which and how to fix it."""


def find_reports(inputs: Sequence[Path]) -> list[Path]:
    """The JSON reports named: a file as given, a directory's ``matrix*.json`` (recursively,
    so a directory of downloaded CI artifacts works as it is)."""
    found: list[Path] = []
    for path in inputs:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            reports = sorted(p for p in path.rglob("matrix*.json") if not p.name.startswith("."))
            if not reports:
                raise MergeError(
                    f"{path}: no matrix*.json in this directory; pass the directories that "
                    "hold the shards' reports"
                )
            found.extend(reports)
        else:
            raise MergeError(f"{path}: no such file or directory")
    return found


def _read(path: Path) -> MatrixResult:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        return MatrixResult.from_json(document)
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: not a harness matrix report ({exc})") from None


def _identity(result: MatrixResult) -> tuple[Any, ...]:
    return (
        result.loop_modes,
        result.pools,
        result.brokers,
        result.versions.get("worker_python"),
        result.shard.total if result.shard else 1,
    )


@dataclass
class MergedShards:
    result: MatrixResult
    sources: dict[int, Path] = field(default_factory=dict)

    def balance_line(self) -> str:
        """``shards: 1/3 6 cells 4.1 s, ...; slowest/mean 1.08``."""
        walls = [
            s["wall_s"] for s in self.result.shards if isinstance(s.get("wall_s"), float | int)
        ]
        parts = [
            f"{s['index']}/{s['total']} {len(s['cells'])} cells "
            + (f"{s['wall_s']:.1f} s" if isinstance(s.get("wall_s"), float | int) else "? s")
            for s in self.result.shards
        ]
        ratio = (
            f"; slowest/mean {max(walls) / (sum(walls) / len(walls)):.2f}"
            if walls and sum(walls)
            else ""
        )
        return "shards: " + ", ".join(parts) + ratio


def merge(paths: Sequence[Path]) -> MergedShards:
    """One result from the shards' reports; MergeError if they are not one matrix's shards."""
    if not paths:
        raise MergeError("no report to merge; pass the shards' reports directories or files")
    results = [(path, _read(path)) for path in paths]
    first_path, first = results[0]
    for path, result in results[1:]:
        if _identity(result) != _identity(first):
            raise MergeError(
                f"{path} is not a shard of the same matrix as {first_path} (selection, worker "
                "Python or shard count differ); merge each matrix's shards separately"
            )
    total = first.shard.total if first.shard else 1
    by_index: dict[int, tuple[Path, MatrixResult]] = {}
    for path, result in results:
        index = result.shard.index if result.shard else 1
        if index in by_index:
            raise MergeError(
                f"shard {index}/{total} is there twice: {by_index[index][0]} and {path}; "
                "pass each shard's report once"
            )
        by_index[index] = (path, result)
    errors: list[str] = []
    shards: list[Mapping[str, Any]] = []
    records = []
    for index in range(1, total + 1):
        shard = Shard(index, total)
        if index not in by_index:
            errors.append(
                f"shard {shard} is missing: no report among the inputs; its cells are not run"
            )
            continue
        path, result = by_index[index]
        records.extend(result.records)
        errors.extend(f"shard {shard}: {error}" for error in result.errors)
        shards.append(
            {
                "index": index,
                "total": total,
                "cells": [cell.label for cell in result.selected_cells()],
                "wall_s": result.wall_s,
                "exit_code": result.exit_code,
                "source": str(path),
            }
        )
    present = [result for _, result in by_index.values()]
    codes = [r.pytest_exit_code for r in present if r.pytest_exit_code is not None]
    merged = MatrixResult(
        loop_modes=first.loop_modes,
        pools=first.pools,
        brokers=first.brokers,
        services=first.services,
        records=records,
        errors=errors,
        pytest_exit_code=max(codes) if codes else None,
        served_by=first.served_by,
        versions=first.versions,
        machine=first.machine,
        wall_s=max((r.wall_s for r in present if r.wall_s is not None), default=None),
        shard=None,
        shards=shards,
    )
    return MergedShards(merged, {i: p for i, (p, _) in by_index.items()})
