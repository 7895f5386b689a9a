"""The pytest plugin: options with ini pairs, the matrix markers, and the resolved config.

Loaded through the ``pytest11`` entry point, so any project that installs ingest-harness gets it.
"""

from __future__ import annotations

from typing import Final

import pytest

from harness.config import (
    ALL_LOOP_MODES,
    ALL_POOLS,
    BROKERS,
    SERVICE_MODES,
    ConfigError,
    HarnessConfig,
)

__all__ = ["CELL_FIXTURE", "harness_config_key"]

harness_config_key: Final = pytest.StashKey[HarnessConfig]()
CELL_FIXTURE: Final = "matrix_cell"

_OPTIONS: Final = (
    (
        "loop_mode",
        "--loop-mode",
        "loop modes to run, comma-separated or 'all': " + ", ".join(ALL_LOOP_MODES),
    ),
    ("pool", "--pool", "worker pools, comma-separated or 'all': " + ", ".join(ALL_POOLS)),
    ("broker", "--broker", "brokers, comma-separated or 'all': " + ", ".join(BROKERS)),
    (
        "services",
        "--services",
        "where Postgres and Redis come from: " + "|".join(SERVICE_MODES)
        + " (auto: docker where an engine answers, else local binaries)",
    ),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ingest-harness", "ingest-harness matrix")
    for name, flag, help_text in _OPTIONS:
        group.addoption(flag, dest=f"harness_{name}", default=None, help=help_text)
        parser.addini(f"harness_{name}", help_text, default=None)


def pytest_configure(config: pytest.Config) -> None:
    for mode in ALL_LOOP_MODES:
        config.addinivalue_line("markers", f"{mode}: matrix cell in loop mode {mode}")
    for pool in ALL_POOLS:
        config.addinivalue_line("markers", f"{pool}: matrix cell on the {pool} worker pool")
    for broker in BROKERS:
        config.addinivalue_line("markers", f"{broker}: matrix cell on the {broker} broker")
    config.addinivalue_line("markers", "matrix: a scenario parametrized over the matrix cells")
    config.addinivalue_line(
        "markers", "integration: needs the real Postgres and Redis started by the harness"
    )
    try:
        harness_config = HarnessConfig.resolve(
            get_option=lambda name: config.getoption(f"harness_{name}"),
            get_ini=lambda name: config.getini(f"harness_{name}"),
        )
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[harness_config_key] = harness_config


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if CELL_FIXTURE not in metafunc.fixturenames:
        return
    harness_config = metafunc.config.stash[harness_config_key]
    params = []
    for mode, pool, broker in harness_config.cells():
        marks = [getattr(pytest.mark, mode), pytest.mark.matrix]
        if pool != "-":
            marks.append(getattr(pytest.mark, pool))
        if broker != "-":
            marks.append(getattr(pytest.mark, broker))
        cell_id = mode if pool == "-" else f"{mode}-{pool}-{broker}"
        params.append(pytest.param((mode, pool, broker), id=cell_id, marks=marks))
    metafunc.parametrize(CELL_FIXTURE, params, indirect=True)
