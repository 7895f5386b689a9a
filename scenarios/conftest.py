"""Scenario-wide collection order: the longest scenario first.

``test_prefix_runner`` runs a whole matrix in a child process (seconds, mostly waiting on its
workers). Collected last, it would start when the other xdist worker has nothing left to do;
first, it overlaps the rest of the matrix. The order of the other scenarios is unchanged.
"""

from __future__ import annotations

import pytest

_FIRST = "test_prefix_runner_fails_exactly_the_running_cells"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort: every xdist worker must collect the same order.
    items.sort(key=lambda item: getattr(item, "originalname", item.name) != _FIRST)
