"""The docker and compose backends against a real engine: errors that name the fix, the reaper.

Marked ``docker``: these run in the docker tier (scripts/docker-tier.sh), where an engine
answers; without one each fails, never skips. The images are the session's settings
(HARNESS_POSTGRES_IMAGE / HARNESS_REDIS_IMAGE, or the official ones).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness.pytest.plugin import harness_config_key
from harness.services import DockerImages, ServiceStack, ServiceStartError, probe_docker
from harness.services._compose import ComposeError, compose_down, compose_up
from harness.services._docker import (
    LABEL_OWNER_HOST,
    LABEL_OWNER_PID,
    LABEL_OWNER_START,
    LABEL_SESSION,
    docker_client,
    our_containers,
    reap_orphans,
)
from harness.services._proc import log

# An image build from scratch takes minutes on two cores: far past the default deadline.
pytestmark = [pytest.mark.docker, pytest.mark.deadline(1800)]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def images(request: pytest.FixtureRequest) -> DockerImages:
    probe = probe_docker(os.environ)
    assert probe.ok, f"the docker tests need an engine: {probe.detail}; {probe.fix}"
    config = request.config.stash[harness_config_key]
    return DockerImages(postgres=config.postgres_image, redis=config.redis_image)


def test_a_missing_image_says_how_to_build_one(images: DockerImages) -> None:
    missing = DockerImages(postgres="ingest-harness/no-such-image:0", redis=images.redis)

    with pytest.raises(ServiceStartError) as info:
        ServiceStack("docker", images=missing).start()

    message = str(info.value)
    assert "'ingest-harness/no-such-image:0' is not on the engine and pulling it failed" in message
    assert "scripts/docker-engine.sh start" in message
    assert "--postgres-image" in message and "HARNESS_POSTGRES_IMAGE" in message
    assert not [c for c in our_containers(os.environ) if c[LABEL_OWNER_PID] == str(os.getpid())]


def test_a_container_that_never_gets_ready_shows_its_log(images: DockerImages) -> None:
    # The Redis image asked to run Postgres's command: it exits at once, with its reason.
    wrong = DockerImages(postgres=images.redis, redis=images.redis)

    with pytest.raises(ServiceStartError) as info:
        ServiceStack("docker", images=wrong).start()

    error = info.value
    assert "the postgres container" in error.what and "did not become ready" in error.what
    assert error.log_tail, "no log lines of the failed container"
    assert "Last log lines:" in str(error)
    # Its containers were removed with the failed start.
    assert not [c for c in our_containers(os.environ) if c[LABEL_OWNER_PID] == str(os.getpid())]


def _dead_pid() -> tuple[int, float]:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    return child.pid, started


def test_the_reaper_removes_what_a_dead_owner_left_and_only_that(images: DockerImages) -> None:
    pid, started = _dead_pid()
    here = socket.gethostname()
    dead = {
        LABEL_OWNER_HOST: here,
        LABEL_OWNER_PID: str(pid),
        LABEL_OWNER_START: f"{started:.2f}",
        LABEL_SESSION: "dead",
    }
    me = psutil.Process()
    alive = {**dead, LABEL_OWNER_PID: str(me.pid), LABEL_OWNER_START: f"{me.create_time():.2f}"}
    with docker_client(os.environ) as client:
        made = {
            name: client.containers.create(images.redis, labels=labels, name=f"reap-{name}-{pid}")
            for name, labels in (("dead", dead), ("alive", alive))
        }
        network = client.networks.create(f"reap-net-{pid}", labels=dead)
        volume = client.volumes.create(f"reap-vol-{pid}", labels=dead)
        try:
            removed = reap_orphans(os.environ, log)

            names = {c["name"] for c in our_containers(os.environ)}
            assert f"reap-dead-{pid}" not in names
            assert f"reap-alive-{pid}" in names
            assert f"container reap-dead-{pid}" in removed
            assert f"network {network.name}" in removed and f"volume {volume.name}" in removed
        finally:
            made["alive"].remove(force=True)


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_compose_with_a_taken_port_names_the_variable(
    images: DockerImages, held_port: int, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "HARNESS_COMPOSE_PROJECT": f"harness-port-test-{os.getpid()}",
        "HARNESS_COMPOSE_REDIS_PORT": str(held_port),
    }
    file = ROOT / "docker-compose.test.yml"
    try:
        with pytest.raises(ComposeError) as info:
            compose_up(env, file=file, timeout=60)
    finally:
        compose_down(env, file=file)

    message = str(info.value)
    assert "a host port it asked for is taken" in message
    assert f"HARNESS_COMPOSE_REDIS_PORT={held_port}" in message
    assert "unset HARNESS_COMPOSE_<SERVICE>_PORT" in message
