"""Root conftest: wires the thin fixtures in ``fixtures/`` (the logic lives in ``harness/``).

The session's services, database and cell come from the harness's own fixtures
(``harness.pytest.fixtures``), which the plugin registers because pytest.ini names a Target."""

import freezegun

pytest_plugins = [
    "fixtures.marketplace",
    "fixtures.app",
    "fixtures.api",
    "fixtures.worker",
]

# freezegun scans every loaded module's attributes when it starts; reading testcontainers'
# config object there makes docker-py probe for an engine and leak a socket (a ResourceWarning,
# an error here) when none answers.
freezegun.configure(extend_ignore_list=["testcontainers", "docker"])
