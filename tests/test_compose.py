"""docker-compose.test.yml agrees with the harness: service names, ports, credentials, images.

``--services=compose`` finds the project's services by these names and connects with these
credentials (harness/services/_compose.py); a file edited on its own would break it only at run
time, in CI. No engine is needed here: the file is read as data.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.core.config import DEFAULT_POSTGRES_IMAGE, DEFAULT_REDIS_IMAGE, check_image
from harness.services import _compose, _docker

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / _compose.COMPOSE_FILE


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    found: dict[str, Any] = document["services"]
    return found


def test_the_services_are_the_harness_s(services: dict[str, Any]) -> None:
    assert list(services) == list(_compose.COMPOSE_PORTS)


@pytest.mark.parametrize("service", list(_compose.COMPOSE_PORTS))
def test_each_port_is_on_loopback_and_free_unless_asked(
    services: dict[str, Any], service: str
) -> None:
    port = _compose.COMPOSE_PORTS[service]
    assert services[service]["ports"] == [
        f"127.0.0.1:${{HARNESS_COMPOSE_{service.upper()}_PORT:-}}:{port}"
    ]


@pytest.mark.parametrize("service", list(_compose.COMPOSE_PORTS))
def test_each_service_has_a_healthcheck(services: dict[str, Any], service: str) -> None:
    check = services[service]["healthcheck"]
    assert check["test"] and check["retries"] >= 10


def test_credentials_are_the_harness_s(services: dict[str, Any]) -> None:
    assert services["postgres"]["environment"] == {
        "POSTGRES_USER": _compose.POSTGRES_USER,
        "POSTGRES_PASSWORD": _compose.POSTGRES_PASSWORD,
        "POSTGRES_DB": _compose.POSTGRES_DB,
    }
    assert services["rabbitmq"]["environment"] == {
        "RABBITMQ_DEFAULT_USER": _compose.RABBITMQ_USER,
        "RABBITMQ_DEFAULT_PASS": _compose.RABBITMQ_PASSWORD,
    }
    assert f"-U {_compose.POSTGRES_USER} -d {_compose.POSTGRES_DB}" in " ".join(
        services["postgres"]["healthcheck"]["test"]
    )


def test_images_are_the_docker_backend_s_settings(services: dict[str, Any]) -> None:
    assert services["postgres"]["image"] == (
        f"${{{_docker.POSTGRES_IMAGE_VAR}:-{_docker.POSTGRES_IMAGE}}}"
    )
    assert services["redis"]["image"] == f"${{{_docker.REDIS_IMAGE_VAR}:-{_docker.REDIS_IMAGE}}}"
    assert re.fullmatch(r"\$\{HARNESS_RABBITMQ_IMAGE:-[^}]+\}", services["rabbitmq"]["image"])
    # One default in the plugin's config and in the backend.
    assert (DEFAULT_POSTGRES_IMAGE, DEFAULT_REDIS_IMAGE) == (
        _docker.POSTGRES_IMAGE,
        _docker.REDIS_IMAGE,
    )


def test_the_engine_script_names_images_the_harness_accepts() -> None:
    printed = subprocess.run(
        ["bash", str(ROOT / "scripts/docker-engine.sh"), "env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = dict(re.findall(r"^export (\w+)=(\S+)$", printed, re.MULTILINE))
    assert set(names) == {
        "DOCKER_HOST",
        _docker.POSTGRES_IMAGE_VAR,
        _docker.REDIS_IMAGE_VAR,
        "HARNESS_RABBITMQ_IMAGE",
    }
    for var in (_docker.POSTGRES_IMAGE_VAR, _docker.REDIS_IMAGE_VAR, "HARNESS_RABBITMQ_IMAGE"):
        assert check_image(names[var], option=var) == names[var]
        # Honest names: the stand-ins never pass for the official images.
        assert names[var].startswith("ingest-harness/")
    assert names["DOCKER_HOST"].startswith("unix://") and "/var/run/docker.sock" not in printed
