"""--shard K/N: every cell in exactly one shard, split by (pool, broker) where it can."""

from __future__ import annotations

import pytest

from harness.core.cell import POOLS, Cell
from harness.core.config import ConfigError, HarnessConfig
from harness.core.shard import Shard, ShardError, parse_shard, plan, shard_of_key


def selection(pools: tuple[str, ...] = POOLS, brokers: tuple[str, ...] = ("redis", "amqp")):
    return HarnessConfig(pools=pools, brokers=brokers, env={}).all_cells()


SELECTIONS = {
    "all-both": (POOLS, ("redis", "amqp")),  # 43 cells
    "default": (("prefork", "solo", "threads"), ("redis",)),  # 17 cells
    "solo": (("solo",), ("redis",)),  # 6 cells
}


@pytest.mark.parametrize(
    ("name", "total"),
    [(name, n) for name in SELECTIONS for n in (1, 2, 3, 4, 5, 6, 7, 11, 17, 43)
     if n <= len(selection(*SELECTIONS[name]))],
)  # fmt: skip
def test_every_cell_lands_in_exactly_one_shard(name: str, total: int) -> None:
    cells = selection(*SELECTIONS[name])
    shards = [Shard(k, total).cells(cells) for k in range(1, total + 1)]
    flat = [cell for shard in shards for cell in shard]
    assert sorted(flat) == sorted(cells)  # all of them, none twice
    assert all(shards), "no shard is empty"
    sizes = [len(s) for s in shards]
    # Whole groups are at most the largest group apart; split groups at most ceil-halves.
    largest_group = max(sum((c.pool, c.broker) == (d.pool, d.broker) for d in cells) for c in cells)
    assert max(sizes) - min(sizes) <= largest_group
    # Deterministic: computed again (another CI job), the same plan.
    assert plan(cells, total) == plan(list(cells), total)


def test_with_enough_groups_a_shard_boots_only_its_own_workers() -> None:
    cells = selection()  # 4 pools x 2 brokers + in_process: 9 groups
    for total in (2, 3, 4, 9):
        owners: dict[tuple[str, str], set[int]] = {}
        for k in range(1, total + 1):
            for cell in Shard(k, total).cells(cells):
                owners.setdefault((cell.pool, cell.broker), set()).add(k)
        assert all(len(shards) == 1 for shards in owners.values()), (total, owners)


def test_fewer_groups_than_shards_splits_the_largest_group() -> None:
    cells = selection(("prefork", "solo"), ("redis",))  # prefork 6, solo 5, in_process 1
    shards = plan(cells, 4)
    # prefork's 6 are halved; solo's 5 stay together; in_process alone.
    assert [len(s) for s in shards] == [5, 3, 3, 1]
    assert {c.pool for c in shards[0]} == {"solo"}
    assert {c.pool for c in shards[1] + shards[2]} == {"prefork"}
    assert shards[3] == (Cell("in_process"),)


def test_more_shards_than_cells_is_an_error_naming_the_limit() -> None:
    with pytest.raises(ShardError, match=r"has 1 cell\(s\), fewer than 2 shards; use N <= 1"):
        plan([Cell("in_process")], 2)
    with pytest.raises(ConfigError, match=r"^HARNESS_SHARD: the selection has 1 cell"):
        HarnessConfig.resolve(
            get_option=lambda name: None,
            get_ini=lambda name: None,
            env={"HARNESS_SHARD": "1/2", "HARNESS_LOOP_MODE": "in_process"},
        )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("3", "is not a shard; use K/N"),
        ("a/b", "is not a shard; use K/N"),
        ("0/3", "names no shard; K must be 1 to N"),
        ("4/3", "names no shard; K must be 1 to N"),
        ("1/0", "names no shard"),
    ],
)
def test_a_bad_shard_names_its_option(value: str, message: str) -> None:
    with pytest.raises(ShardError, match=f"^--shard: {value!r} {message}".replace("/", "/")):
        parse_shard(value, option="--shard")


def test_config_cells_are_the_shards_part() -> None:
    config = HarnessConfig.resolve(
        get_option={"shard": "2/3"}.get, get_ini=lambda name: None, env={}
    )
    assert config.shard == Shard(2, 3)
    assert config.cells() == Shard(2, 3).cells(config.all_cells())
    assert len(config.all_cells()) == 17


def test_tests_outside_the_matrix_spread_by_node_id() -> None:
    keys = [f"tests/test_x.py::test_{i}" for i in range(200)]
    shards = [shard_of_key(key, 3) for key in keys]
    assert set(shards) == {1, 2, 3}
    assert shards == [shard_of_key(key, 3) for key in keys]
