"""One shard of the matrix: ``--shard K/N`` runs a deterministic 1/N of the selected cells.

A CI system's parallel jobs are the distributed engine: each job runs ``harness matrix --shard
K/N`` (or ``pytest --shard K/N``) on the same selection, and ``harness report merge`` puts the
shards' reports back together. The split is a pure function of the selected cells and N, so
every job computes the same plan without talking to the others.

Cells are split by worker group, ``(pool, broker)``, where the groups are enough for N shards:
a shard then boots only the Celery workers it needs. Where there are fewer groups than shards,
the largest group is halved (by loop mode) until there are enough pieces. The pieces go to the
least loaded shard, largest first (longest processing time first), counted in cells; ties go
to the lowest shard. Every cell lands in exactly one shard.

This module imports only :mod:`harness.core.cell` and the error tree.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from harness.core.cell import Cell
from harness.core.errors import UsageError

__all__ = ["SHARD_ENV", "Shard", "ShardError", "parse_shard", "plan", "shard_of_key"]

SHARD_ENV: Final = "HARNESS_SHARD"
_SYNTAX: Final = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


class ShardError(UsageError):
    """A ``--shard`` value that names no shard of this selection; the message names the fix."""


@dataclass(frozen=True, order=True)
class Shard:
    """Shard ``index`` of ``total``, counted from 1 (as ``--shard 2/3`` says it)."""

    index: int
    total: int

    def __str__(self) -> str:
        return f"{self.index}/{self.total}"

    def cells(self, selected: Sequence[Cell]) -> list[Cell]:
        """This shard's cells, in the selection's order."""
        mine = set(plan(selected, self.total)[self.index - 1])
        return [cell for cell in selected if cell in mine]

    def owns_key(self, key: str) -> bool:
        """Whether a test that is no cell of the matrix (its node id: ``key``) runs here."""
        return shard_of_key(key, self.total) == self.index


def parse_shard(value: str, *, option: str) -> Shard:
    """``"2/3"`` -> ``Shard(2, 3)``; an error names ``option`` (the flag, ini key or variable)."""
    match = _SYNTAX.fullmatch(value)
    if match is None:
        raise ShardError(f"{option}: {value!r} is not a shard; use K/N, e.g. 2/3 (shard 2 of 3)")
    index, total = int(match[1]), int(match[2])
    if total < 1 or not 1 <= index <= total:
        raise ShardError(
            f"{option}: {value!r} names no shard; K must be 1 to N, e.g. 1/{max(total, 2)}"
        )
    return Shard(index, total)


def _group(cell: Cell) -> tuple[str, str]:
    return (cell.pool, cell.broker)


def plan(selected: Sequence[Cell], total: int) -> list[tuple[Cell, ...]]:
    """The cells of each of ``total`` shards (index 0 is shard 1); raises ShardError when the
    selection has fewer cells than shards, since a shard with nothing to run proves nothing."""
    if total < 1:
        raise ShardError(f"--shard: N must be at least 1, got {total}")
    if len(selected) < total:
        raise ShardError(
            f"--shard: the selection has {len(selected)} cell(s), fewer than {total} shards; "
            f"use N <= {len(selected)} or select more cells"
        )
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in selected:
        groups.setdefault(_group(cell), []).append(cell)
    pieces = list(groups.values())
    while len(pieces) < total:
        largest = max(range(len(pieces)), key=lambda i: (len(pieces[i]), -i))
        piece = pieces[largest]
        half = (len(piece) + 1) // 2
        pieces[largest : largest + 1] = [piece[:half], piece[half:]]
    shards: list[list[Cell]] = [[] for _ in range(total)]
    # sorted() is stable: equal pieces keep the selection's order.
    for piece in sorted(pieces, key=len, reverse=True):
        target = min(range(total), key=lambda k: (len(shards[k]), k))
        shards[target].extend(piece)
    order = {cell: position for position, cell in enumerate(selected)}
    return [tuple(sorted(cells, key=order.__getitem__)) for cells in shards]


def shard_of_key(key: str, total: int) -> int:
    """The shard (from 1) of a test outside the matrix: a stable hash of its node id."""
    return zlib.crc32(key.encode("utf-8")) % total + 1
