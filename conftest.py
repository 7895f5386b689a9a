"""Root conftest: wires the thin fixtures in ``fixtures/`` (the logic lives in ``harness/``)."""

pytest_plugins = [
    "fixtures.db",
    "fixtures.marketplace",
    "fixtures.app",
    "fixtures.api",
    "fixtures.worker",
]
