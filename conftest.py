"""Root conftest: wires the thin fixtures in ``fixtures/`` (the logic lives in ``harness/``)."""

pytest_plugins = ["fixtures.db"]
