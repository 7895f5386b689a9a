"""Postgres and Redis in containers (testcontainers), for machines where a Docker engine answers.

Ryuk, testcontainers' reaper, is never used: its image has to be pulled, which many CI runners
and every offline machine cannot do. Instead every container carries labels naming the process
that owns it (host, pid, process start time), and each docker session that starts or stops
removes the containers whose owner is gone: after SIGKILL of a whole session nothing of ours
survives the next session's start.

The probe talks to the engine's socket itself: docker-py's client leaks its socket (a
ResourceWarning, an error under ``filterwarnings = error``) when no engine is there, and that is
the common case on CI runners and dev boxes without Docker that must stay fast and quiet.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import logging
import socket
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import psutil

from harness.services._base import ProbeResult, ServiceStartError, mask_dsn, with_database

# The official images, as a team with a registry runs them. Where none can be reached, the
# project's scripts/docker-engine.sh builds stand-ins and prints the variables that name them.
POSTGRES_IMAGE: Final = "postgres:16-alpine"
REDIS_IMAGE: Final = "redis:7-alpine"
POSTGRES_IMAGE_VAR: Final = "HARNESS_POSTGRES_IMAGE"
REDIS_IMAGE_VAR: Final = "HARNESS_REDIS_IMAGE"
BUILD_COMMAND: Final = "sudo scripts/docker-engine.sh start && eval $(scripts/docker-engine.sh env)"

# Labels on every container of ours: the owner is a process on a host, identified by its pid
# and its start time (a pid alone is reused).
LABEL_OWNER_HOST: Final = "io.ingest-harness.owner-host"
LABEL_OWNER_PID: Final = "io.ingest-harness.owner-pid"
LABEL_OWNER_START: Final = "io.ingest-harness.owner-start"
LABEL_SESSION: Final = "io.ingest-harness.session"

_DEFAULT_SOCKET: Final = "/var/run/docker.sock"
_STARTUP_TIMEOUT_S: Final = 60.0
_POLL_S: Final = 0.05
_LOG_TAIL: Final = 20
_FIX: Final = (
    "start the Docker engine (`sudo systemctl start docker`; on a machine without one, "
    "`sudo scripts/docker-engine.sh start` runs a private engine, then "
    "`eval $(scripts/docker-engine.sh env)`), or point DOCKER_HOST at one; "
    "or use --services=local (the installed binaries)"
)


@dataclass(frozen=True)
class DockerImages:
    """The images the docker backend runs: settings (``--postgres-image``, ``--redis-image``)."""

    postgres: str = POSTGRES_IMAGE
    redis: str = REDIS_IMAGE

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DockerImages:
        return cls(
            postgres=env.get(POSTGRES_IMAGE_VAR) or POSTGRES_IMAGE,
            redis=env.get(REDIS_IMAGE_VAR) or REDIS_IMAGE,
        )


def _http_ping(sock: socket.socket) -> str:
    """'' if the engine answered GET /_ping with 200, else what it said."""
    sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
    reply = b""
    while len(reply) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    status = reply.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    return "" if " 200 " in f"{status} " else f"answered {status!r}"


def docker_host(env: Mapping[str, str]) -> str:
    """The engine's address: DOCKER_HOST, else the default socket."""
    return env.get("DOCKER_HOST") or f"unix://{_DEFAULT_SOCKET}"


def probe_docker(env: Mapping[str, str], *, timeout: float = 0.5) -> ProbeResult:
    """Does a Docker engine answer GET /_ping at DOCKER_HOST (default /var/run/docker.sock)?"""
    host = env.get("DOCKER_HOST", "")
    target = docker_host(env)
    where = f"DOCKER_HOST={host}" if host else f"DOCKER_HOST is not set; default {target}"
    parsed = urllib.parse.urlsplit(target)
    try:
        if parsed.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = parsed.path
        elif parsed.scheme in ("tcp", "http", "https"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (parsed.hostname or "127.0.0.1", parsed.port or 2375)
        else:
            # ssh://, npipe://: no cheap check; let testcontainers try (auto falls back if it fails)
            return ProbeResult("docker", True, f"{where} (scheme {parsed.scheme!r} not probed)")
        with sock:
            sock.settimeout(timeout)
            sock.connect(address)
            tls = parsed.scheme == "https" or bool(env.get("DOCKER_TLS_VERIFY"))
            problem = "" if tls else _http_ping(sock)  # TLS: reaching the port has to do
    except FileNotFoundError:
        return ProbeResult("docker", False, f"{where}, and that socket does not exist", _FIX)
    except PermissionError as exc:
        return ProbeResult(
            "docker",
            False,
            f"{where}; the engine refused this user: {exc}",
            "add this user to the `docker` group (then log in again), or run as root; " + _FIX,
        )
    except OSError as exc:
        return ProbeResult("docker", False, f"{where}; connecting failed: {exc}", _FIX)
    if problem:
        return ProbeResult("docker", False, f"{where}; the engine {problem} to /_ping", _FIX)
    return ProbeResult("docker", True, f"engine answered at {target}")


# -- testcontainers' settings -----------------------------------------------------------------


def configure_testcontainers(env: Mapping[str, str]) -> None:
    """testcontainers' settings for this harness, where the user has not set them.

    - No Ryuk (its image must be pulled); our labels and `reap_orphans` do its work.
    - An engine on a unix socket or on loopback publishes ports on this machine: reach them
      at 127.0.0.1. testcontainers would otherwise take a machine with ``/.dockerenv`` for a
      container and connect to the bridge's gateway address.
    - Poll readiness every 50 ms, not every second, for up to 60 s.
    """
    from testcontainers.core.config import ConnectionMode
    from testcontainers.core.config import testcontainers_config as tc

    if "TESTCONTAINERS_RYUK_DISABLED" not in env:
        tc.ryuk_disabled = True
    if "TC_POOLING_INTERVAL" not in env:
        tc.sleep_time = _POLL_S
    if "TC_MAX_TRIES" not in env:
        tc.max_tries = int(_STARTUP_TIMEOUT_S / tc.sleep_time)
    parsed = urllib.parse.urlsplit(docker_host(env))
    local = parsed.scheme == "unix" or parsed.hostname in ("127.0.0.1", "localhost", "::1")
    if local and "TESTCONTAINERS_CONNECTION_MODE" not in env:
        tc.connection_mode_override = ConnectionMode.docker_host
    if local and not (env.get("TC_HOST") or env.get("TESTCONTAINERS_HOST_OVERRIDE")):
        tc.tc_host_override = "127.0.0.1"


# -- ownership and the reaper -----------------------------------------------------------------


def owner_labels(session: str) -> dict[str, str]:
    """The labels that tie a container to this process."""
    me = psutil.Process()
    return {
        LABEL_OWNER_HOST: socket.gethostname(),
        LABEL_OWNER_PID: str(me.pid),
        LABEL_OWNER_START: f"{me.create_time():.2f}",
        LABEL_SESSION: session,
    }


def owner_alive(labels: Mapping[str, str]) -> bool:
    """Does the process named by a container's owner labels still run (on this host)?"""
    if labels.get(LABEL_OWNER_HOST) != socket.gethostname():
        return True  # another machine's engine user: not ours to judge
    try:
        proc = psutil.Process(int(labels.get(LABEL_OWNER_PID, "")))
        started = float(labels.get(LABEL_OWNER_START, ""))
    except (ValueError, psutil.NoSuchProcess):
        return False
    try:
        return abs(proc.create_time() - started) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def docker_client(env: Mapping[str, str]) -> Iterator[Any]:
    """A docker-py client for DOCKER_HOST, closed after use."""
    import docker

    client = docker.DockerClient(base_url=docker_host(env), timeout=30)
    try:
        yield client
    finally:
        client.close()


def _listed(client: Any, kind: str) -> list[dict[str, Any]]:
    """Our containers, networks or volumes as the engine lists them: no inspect per item, so
    one removed meanwhile (by a sibling's reaper) cannot fail the listing."""
    selector = {"label": [LABEL_OWNER_PID]}
    if kind == "container":
        found: list[dict[str, Any]] = client.api.containers(all=True, filters=selector)
        return [
            {"id": c["Id"], "name": (c.get("Names") or ["?"])[0].lstrip("/"), "labels": c["Labels"]}
            for c in found
        ]
    if kind == "network":
        return [
            {"id": n["Id"], "name": n["Name"], "labels": n.get("Labels") or {}}
            for n in client.api.networks(filters=selector)
        ]
    volumes = client.api.volumes(filters=selector).get("Volumes") or []
    return [{"id": v["Name"], "name": v["Name"], "labels": v.get("Labels") or {}} for v in volumes]


def _remove(client: Any, kind: str, ident: str) -> bool:
    """Remove one item; False if it was gone already or another reaper is removing it."""
    import docker.errors

    try:
        if kind == "container":
            client.api.remove_container(ident, force=True, v=True)
        elif kind == "network":
            client.api.remove_network(ident)
        else:
            client.api.remove_volume(ident, force=True)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        if exc.status_code == 409:  # "removal ... is already in progress"
            return False
        raise
    return True


def reap_orphans(env: Mapping[str, str], log: logging.Logger) -> list[str]:
    """Remove every container, network and volume of ours whose owner process is gone.

    Returns what this call removed. Sessions that start at once may race to remove the same
    item: what another removes is not an error. Best effort: an engine error is logged, never
    raised.
    """
    removed: list[str] = []
    try:
        with docker_client(env) as client:
            # Containers first: a network or volume in use cannot go.
            for kind in ("container", "network", "volume"):
                for item in _listed(client, kind):
                    if not owner_alive(item["labels"]) and _remove(client, kind, item["id"]):
                        removed.append(f"{kind} {item['name']}")
    except Exception as exc:
        log.warning("services: removing containers of ended sessions failed: %s", exc)
    if removed:
        log.info("services: removed what ended sessions left: %s", ", ".join(removed))
    return removed


def _reap_quietly(env: Mapping[str, str], log: logging.Logger) -> None:
    reap_orphans(env, log)


def our_containers(env: Mapping[str, str]) -> list[dict[str, str]]:
    """Every container of ours on the engine: its name and owner labels (for the leak tests)."""
    with docker_client(env) as client:
        return [{"name": c["name"], **c["labels"]} for c in _listed(client, "container")]


# -- starting ---------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _image_problem(client: Any, image: str, log: logging.Logger) -> str:
    """'' when `image` is on the engine or could be pulled; else why not."""
    import docker.errors

    try:
        client.images.get(image)
        return ""
    except docker.errors.ImageNotFound:
        pass
    log.info("services: pulling %s", image)
    try:
        client.images.pull(image)
        return ""
    except docker.errors.APIError as exc:
        return f"image {image!r} is not on the engine and pulling it failed: {exc.explanation}"


class _EngineUnreachable(Exception):
    """The engine did not answer docker-py; only the description is kept (see below)."""


def _check_images(
    images: DockerImages, env: Mapping[str, str], log: logging.Logger
) -> tuple[list[str], dict[str, str]]:
    """(what is wrong with the images, {service: image@id}) on the engine at DOCKER_HOST."""
    failure = ""
    with warnings.catch_warnings():
        # docker-py leaks the socket of a failed version check (no engine after all); that is
        # its bug, reported by the caller as our start error. The socket is reachable from the
        # exception's traceback: only once the except block has dropped it can it be collected
        # here, while its warning is ignored, rather than in some later test.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            with docker_client(env) as client:
                found = (_image_problem(client, i, log) for i in (images.postgres, images.redis))
                problems = [problem for problem in found if problem]
                versions = {
                    "postgres": image_version(client, images.postgres),
                    "redis": image_version(client, images.redis),
                }
        except Exception as exc:
            failure = _describe(exc)
        gc.collect()
    if failure:
        raise _EngineUnreachable(failure)
    return problems, versions


def image_version(client: Any, image: str) -> str:
    """``name@sha256:<12 hex>`` (the image id, short as `docker images` shows it): what ran."""
    try:
        return f"{image}@{str(client.images.get(image).id)[:19]}"
    except Exception:
        return image


def container_log_tail(container: Any) -> list[str]:
    """The last lines of a docker-py container's log (both backends' errors show them)."""
    try:
        raw: bytes = container.logs(tail=_LOG_TAIL) if container is not None else b""
    except Exception as exc:
        return [f"(no logs: {exc})"]
    return raw.decode("utf-8", "replace").splitlines()[-_LOG_TAIL:]


def _loopback_port(container: Any, port: int) -> None:
    """Publish `port` on 127.0.0.1 only, on a free port the engine picks."""
    container.ports = {f"{port}/tcp": ("127.0.0.1", None)}


class _ContainerExited(BaseException):
    """The container stopped before it became ready.

    A BaseException: testcontainers' wait loops retry every Exception until their timeout
    (60 s), and a container that has exited will never answer.
    """


def _fail_fast(container: Any, method: str) -> None:
    """Make ``container.<method>``, which the wait strategy calls each try, first check that
    the container still runs."""
    original = getattr(container, method)

    def checked(*args: Any, **kwargs: Any) -> Any:
        wrapped = container.get_wrapped_container()
        if wrapped is not None:
            wrapped.reload()
            if wrapped.status in ("exited", "dead"):
                code = wrapped.attrs.get("State", {}).get("ExitCode")
                raise _ContainerExited(f"the container exited with code {code} before it was ready")
        return original(*args, **kwargs)

    setattr(container, method, checked)


@dataclass(frozen=True)
class DockerStarted:
    """What the docker backend started, for ``Services``."""

    postgres_url: str
    postgres_admin_url: str
    redis_url: str
    images: dict[str, str]


def start_docker(
    images: DockerImages,
    push: Callable[[str, Callable[[], None]], None],
    log: logging.Logger,
    env: Mapping[str, str],
) -> DockerStarted:
    """Start both containers side by side; each is registered with `push` once it exists, so
    the caller's stop() removes it whatever fails next."""
    try:
        from testcontainers.community.postgres import PostgresContainer
        from testcontainers.community.redis import RedisContainer
    except ImportError as exc:
        raise ServiceStartError(
            f"the docker backend needs testcontainers: {exc}",
            fix="pip install 'testcontainers[postgres,redis]>=4.4' (the project's test extra)",
        ) from exc
    configure_testcontainers(env)
    try:
        problems, versions = _check_images(images, env, log)
    except _EngineUnreachable as exc:
        raise ServiceStartError(
            f"the docker backend failed to reach the engine at {docker_host(env)}: {exc}",
            fix=_FIX,
        ) from None
    if problems:
        raise ServiceStartError(
            "the docker backend cannot run its images: " + "; ".join(problems),
            checked=[
                f"engine at {docker_host(env)}",
                f"postgres image {images.postgres} ({POSTGRES_IMAGE_VAR}, --postgres-image)",
                f"redis image {images.redis} ({REDIS_IMAGE_VAR}, --redis-image)",
            ],
            fix=f"build local stand-ins with `{BUILD_COMMAND}`, or `docker pull` the images, "
            "or name images the engine has with --postgres-image / --redis-image",
        )
    reap_orphans(env, log)
    # At stop too: a sibling xdist worker that was killed left its containers behind.
    push("containers of ended sessions", lambda: _reap_quietly(env, log))
    labels = owner_labels(uuid.uuid4().hex)
    # PGDATA on tmpfs and no fsync: initdb and every commit stay in memory, as the local
    # backend's cluster does (a test database is thrown away; 2 s against 1 s to ready).
    pg = PostgresContainer(
        images.postgres, username="postgres", password="postgres", dbname="postgres"
    ).with_command("postgres -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
    pg.with_tmpfs_mount("/var/lib/postgresql/data")
    rc = RedisContainer(images.redis)
    for container in (pg, rc):
        container.with_kwargs(labels=labels)
    _loopback_port(pg, 5432)
    _loopback_port(rc, 6379)
    _fail_fast(pg, "exec")  # PostgresContainer's wait runs psql in the container
    _fail_fast(rc, "get_client")  # RedisContainer's pings from here
    push("postgres container", pg.stop)
    push("redis container", rc.stop)

    def start(name: str, container: Any) -> None:
        log.info("services: starting %s container (%s)", name, container.image)
        began = time.monotonic()
        try:
            container.start()
        except _ContainerExited as exc:
            raise RuntimeError(str(exc)) from None
        log.info("services: %s ready in %.2f s", name, time.monotonic() - began)

    with warnings.catch_warnings(), concurrent.futures.ThreadPoolExecutor(2) as pool:
        # When the engine vanishes between probe and start, docker-py leaks the socket of its
        # failed version check; that is its bug, reported here as our start error.
        warnings.simplefilter("ignore", ResourceWarning)
        futures = {
            name: pool.submit(start, name, c) for name, c in (("postgres", pg), ("redis", rc))
        }
        errors = {name: future.exception() for name, future in futures.items()}
    failed = [(name, error) for name, error in errors.items() if error is not None]
    if failed:
        name, error = failed[0]
        container = pg if name == "postgres" else rc
        raise ServiceStartError(
            f"the {name} container ({container.image}) did not become ready: {_describe(error)}",
            checked=[f"engine at {docker_host(env)}", f"image {versions[name]}"],
            log_tail=container_log_tail(container.get_wrapped_container()),
            fix="read the container's log above; check the image's entrypoint and `docker info`",
        ) from error
    pg_url: str = pg.get_connection_url()
    redis_url = f"redis://{rc.get_container_host_ip()}:{rc.get_exposed_port(6379)}/0"
    log.info("docker services: %s, %s", mask_dsn(pg_url), redis_url)
    return DockerStarted(
        postgres_url=pg_url,
        postgres_admin_url=with_database(pg_url, "postgres"),
        redis_url=redis_url,
        images=versions,
    )
