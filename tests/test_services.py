"""The service layer against real servers: local binaries, the machine's own servers (external),
and the mode resolution with injected probes (the only stand-ins used here).
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import psutil
import psycopg2  # type: ignore[import-untyped]
import pytest
import redis
from sqlalchemy import create_engine, text

import harness.services as services_pkg
from harness.services import (
    LocalPostgres,
    LocalRedis,
    ProbeResult,
    Services,
    ServicesError,
    ServiceStack,
    ServiceStartError,
    ServicesUnavailable,
    _proc,
    create_database,
    drop_database,
    mask_dsn,
    probe_docker,
    probe_local,
)
from harness.services._base import Backend, libpq_dsn

MACHINE_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
MACHINE_REDIS = "redis://127.0.0.1:6379/15"


# --- helpers & fixtures --------------------------------------------------------------------------


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _server_children(
    root: psutil.Process, *, besides: set[int] | frozenset[int] = frozenset()
) -> list[psutil.Process]:
    """Postgres/Redis processes under ``root``, leaving out ``besides`` (servers that were
    already running, such as the session's own stack when other tests used it)."""
    found = []
    for p in root.children(recursive=True):
        try:
            if p.pid not in besides and p.name().startswith(("postgres", "redis-server")):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _scalar(url: str, query: str) -> object:
    conn = psycopg2.connect(libpq_dsn(url), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchone()[0]
    finally:
        conn.close()


def _database_exists(admin_url: str, name: str) -> bool:
    conn = psycopg2.connect(libpq_dsn(admin_url), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


def _failing(backend: Backend) -> ProbeResult:
    return ProbeResult(backend, False, f"{backend} says no (injected)", f"fix {backend} (injected)")


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One template cache for the module: the first local start builds it, the rest copy it."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture
def base_env(cache_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    env.pop("DOCKER_HOST", None)
    env["XDG_CACHE_HOME"] = str(cache_home)
    return env


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A dir on tmpfs every user can enter (postgres runs as another user when we are root)."""
    path = Path(tempfile.mkdtemp(prefix="svc-test-", dir=_proc.default_workdir()))
    path.chmod(0o755)
    yield path
    _proc.remove_tree(path, "test workdir")


# --- pure helpers ----------------------------------------------------------------------------


def test_all_is_sorted_and_complete() -> None:
    exported = set(services_pkg.__all__)
    # isidentifier: pytest's assertion rewriting adds "@py_builtins" and "@pytest_ar" to a
    # module it rewrote (this one is, when the run imports it after pytest's hook is in place).
    public = {n for n in vars(services_pkg) if n.isidentifier() and not n.startswith("_")}
    assert sorted(services_pkg.__all__) == services_pkg.__all__
    assert public == exported
    for name in services_pkg.__all__:
        assert getattr(services_pkg, name) is not None


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "postgresql+psycopg2://user:s3cret@127.0.0.1:5432/db",
            "postgresql+psycopg2://user:***@127.0.0.1:5432/db",
        ),
        ("postgresql://postgres@127.0.0.1:5432/db", "postgresql://postgres@127.0.0.1:5432/db"),
        ("postgresql://127.0.0.1:5432/db", "postgresql://127.0.0.1:5432/db"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://127.0.0.1:6379/15", "redis://127.0.0.1:6379/15"),
        ("rediss://default:pw@host:6380/1", "rediss://default:***@host:6380/1"),
        ("amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
        ("amqp://127.0.0.1:5672//", "amqp://127.0.0.1:5672//"),
        # raw '@' and '/' in the password (unencoded, as pasted)
        ("postgresql://u:p@ss/w@db.example:5432/x", "postgresql://u:***@db.example:5432/x"),
        # an '@' in the query string is not userinfo
        (
            "postgresql://h:5432/db?application_name=a@b",
            "postgresql://h:5432/db?application_name=a@b",
        ),
        ("postgresql://u:pw@h/db?x=1&password=top", "postgresql://u:***@h/db?x=1&password=***"),
        ("postgresql://h/db?password=top", "postgresql://h/db?password=***"),
        ("host=h user=u password=top dbname=d", "host=h user=u password=*** dbname=d"),
        ("postgresql://u:@h/db", "postgresql://u:@h/db"),
        ("", ""),
        ("not a url", "not a url"),
        ("://", "://"),
    ],
)
def test_mask_dsn(url: str, masked: str) -> None:
    assert mask_dsn(url) == masked


def test_mask_dsn_never_raises_on_odd_input() -> None:
    assert mask_dsn(None) == "None"  # type: ignore[arg-type]
    assert isinstance(mask_dsn(b"redis://:x@h"), str)  # type: ignore[arg-type]
    assert "secret" not in mask_dsn("amqp://u:secret@" + "x" * 10000)


def test_services_masks_passwords_in_repr_and_describe() -> None:
    svc = Services(
        backend="external",
        postgres_url="postgresql+psycopg2://u:pgpw@h:5432/ingest_x",
        postgres_admin_url="postgresql+psycopg2://u:pgpw@h:5432/postgres",
        redis_url="redis://:redispw@h:6379/15",
        amqp_url="amqp://guest:amqppw@h:5672//",
        postgres_version="16.4",
        redis_version="7.2.5",
    )
    for rendered in (repr(svc), svc.describe(), str(svc.masked())):
        assert "pgpw" not in rendered and "redispw" not in rendered and "amqppw" not in rendered
    assert svc.masked().postgres_url == "postgresql+psycopg2://u:***@h:5432/ingest_x"
    assert svc.masked().amqp_url == "amqp://guest:***@h:5672//"
    assert svc.postgres_url.endswith("u:pgpw@h:5432/ingest_x")  # the real one is untouched


def test_bad_mode_and_database_name_are_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="auto, docker, local, external"):
        ServiceStack("podman")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plain identifier"):
        ServiceStack("local", database="x; DROP DATABASE postgres")


# --- probes and mode resolution ----------------------------------------------------------------


def test_docker_probe_without_an_engine_says_what_it_checked(tmp_path: Path) -> None:
    missing = probe_docker({"DOCKER_HOST": f"unix://{tmp_path}/docker.sock"})
    assert not missing.ok
    assert "does not exist" in missing.detail and "docker.sock" in missing.detail
    assert "start the Docker engine" in missing.fix

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = probe_docker({"DOCKER_HOST": f"tcp://127.0.0.1:{port}"})
    assert not refused.ok and "connecting failed" in refused.detail


def test_docker_probe_rejects_something_that_is_not_docker(tmp_path: Path) -> None:
    # A server of our own that accepts TCP but is no Docker engine (it answers as Redis
    # would): connecting alone is not enough. Never the machine's own Redis.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"-ERR unknown command 'GET'\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        result = probe_docker({"DOCKER_HOST": f"tcp://127.0.0.1:{port}"}, timeout=0.5)
        thread.join(timeout=5)
    assert not result.ok
    assert "the engine answered" in result.detail and "ERR unknown command" in result.detail


def test_local_probe_lists_the_paths_it_checked(tmp_path: Path) -> None:
    result = probe_local(
        {"PATH": str(tmp_path)}, pg_search=[tmp_path / "pg"], redis_search=[tmp_path / "rs"]
    )
    assert not result.ok
    assert str(tmp_path / "pg") in result.detail and str(tmp_path / "rs") in result.detail
    assert "apt-get install postgresql redis-server" in result.fix


def test_nothing_available_error_lists_every_backend_and_its_fix(tmp_path: Path) -> None:
    local_probe = functools.partial(
        probe_local, pg_search=[tmp_path / "nowhere"], redis_search=[tmp_path / "nowhere"]
    )
    stack = ServiceStack(
        "auto",
        env={"PATH": str(tmp_path), "DOCKER_HOST": f"unix://{tmp_path}/docker.sock"},
        local_probe=local_probe,
    )
    with pytest.raises(ServicesUnavailable) as info:
        stack.start()
    message = str(info.value)
    assert [a.backend for a in info.value.attempts] == ["docker", "local", "external"]
    assert "docker.sock" in message and "start the Docker engine" in message
    assert str(tmp_path / "nowhere") in message and "apt-get install" in message
    assert "HARNESS_DATABASE_URL and HARNESS_REDIS_URL not set" in message
    assert "--services=" in message
    assert stack.services is None


def test_explicit_docker_without_engine_raises_with_a_hint(tmp_path: Path) -> None:
    stack = ServiceStack("docker", env={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"})
    with pytest.raises(ServicesUnavailable, match="start the Docker engine") as info:
        stack.start()
    assert "'docker' service backend is not available" in str(info.value)
    assert [a.backend for a in info.value.attempts] == ["docker"]


def test_explicit_docker_that_fails_to_start_raises_start_error(tmp_path: Path) -> None:
    # The probe is told an engine answers; testcontainers then finds none (as here, for real).
    ok = ProbeResult("docker", True, "engine answered (injected)")
    stack = ServiceStack(
        "docker",
        env={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"},
        docker_probe=lambda env: ok,
    )
    with pytest.raises(ServiceStartError, match="docker backend failed"):
        stack.start()


def test_explicit_local_without_binaries_lists_paths(tmp_path: Path) -> None:
    local_probe = functools.partial(
        probe_local, pg_search=[tmp_path / "pgbin"], redis_search=[tmp_path / "redis-server"]
    )
    with pytest.raises(ServicesUnavailable) as info:
        ServiceStack("local", env={}, local_probe=local_probe).start()
    assert str(tmp_path / "pgbin") in str(info.value)
    assert str(tmp_path / "redis-server") in str(info.value)
    assert "Hint: install the servers" in str(info.value)


def test_explicit_external_without_urls_says_which_variables(tmp_path: Path) -> None:
    with pytest.raises(ServicesUnavailable, match="HARNESS_REDIS_URL not set"):
        ServiceStack("external", env={"HARNESS_DATABASE_URL": MACHINE_PG}).start()


def test_errors_survive_pickling() -> None:
    unavailable = ServicesUnavailable("auto", [_failing("docker"), _failing("local")])
    start = ServiceStartError("boom", checked=["x"], fix="y", log_tail=["a", "b"])
    for exc in (unavailable, start):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert back.__dict__ == exc.__dict__


# --- local backend (real servers) ----------------------------------------------------------------


@pytest.mark.integration
def test_local_stack_serves_real_postgres_and_redis_and_stop_leaves_nothing(
    base_env: dict[str, str], workdir: Path
) -> None:
    earlier = {p.pid for p in _server_children(psutil.Process())}
    stack = ServiceStack("local", workdir=workdir, env=base_env)
    svc = stack.start()
    try:
        assert svc.backend == "local"
        assert svc.postgres_url.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
        assert svc.postgres_url.endswith("/ingest")
        assert svc.postgres_admin_url.endswith("/postgres")
        assert svc.redis_url.startswith("redis://127.0.0.1:") and svc.redis_url.endswith("/0")
        assert svc.postgres_version.startswith(("15", "16", "17", "18", "14", "13"))
        assert svc.redis_version.count(".") == 2
        assert stack.start() is svc  # idempotent

        engine = create_engine(svc.postgres_url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
                assert conn.execute(text("SELECT current_database()")).scalar() == "ingest"
                backend_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
                assert psutil.Process(backend_pid).uids().real != 0  # not root, even if we are
        finally:
            engine.dispose()

        client = redis.Redis.from_url(svc.redis_url)
        try:
            assert client.ping() is True
        finally:
            client.close()

        servers = _server_children(psutil.Process(), besides=earlier)
        names = {p.name() for p in servers}
        assert any(n.startswith("postgres") for n in names) and "redis-server" in names
        kinds = sorted(d.name.split("-")[3] for d in workdir.iterdir())
        assert kinds[:2] == ["pg", "redis"] or kinds == ["pg", "pg", "redis"]  # + a cache snapshot
    finally:
        stack.stop()
    assert _wait_gone(servers, 1.0) == []  # stop() itself waits for them
    assert list(workdir.iterdir()) == []
    stack.stop()  # twice is fine
    assert stack.services is None


@pytest.mark.integration
def test_stop_from_a_signal_handler_that_interrupts_stop(
    base_env: dict[str, str], workdir: Path
) -> None:
    earlier = {p.pid for p in _server_children(psutil.Process())}
    stack = ServiceStack("local", workdir=workdir, env=base_env)
    stack.start()
    servers = _server_children(psutil.Process(), besides=earlier)
    calls: list[str] = []

    def handler(signum: int, frame: object) -> None:
        calls.append("handler")
        stack.stop()  # re-enters the stop() that the signal interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        # Runs first in stop() (newest first), so the handler's stop() does the real work.
        stack._push("raise SIGUSR1", lambda: os.kill(os.getpid(), signal.SIGUSR1))
        stack.stop()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == ["handler"]
    assert _wait_gone(servers, 1.0) == []
    assert list(workdir.iterdir()) == []


@pytest.mark.integration
def test_second_start_copies_the_cached_template(tmp_path: Path, workdir: Path) -> None:
    cache = tmp_path / "cache"
    with LocalPostgres(workdir=workdir, cache_dir=cache) as first:
        assert first.from_template is False
        assert _scalar(first.admin_url, "SELECT 1") == 1
    templates = list(cache.iterdir())
    assert len(templates) == 1 and templates[0].name.startswith("pgtemplate-15")
    with LocalPostgres(workdir=workdir, cache_dir=cache) as second:
        assert second.from_template is True
        assert _scalar(second.admin_url, "SELECT count(*) FROM pg_database") == 3
    assert list(cache.iterdir()) == templates  # reused, not rebuilt
    assert list(workdir.iterdir()) == []


@pytest.mark.integration
def test_auto_resolves_to_local_here(base_env: dict[str, str], workdir: Path) -> None:
    if probe_docker(base_env).ok:
        pytest.skip("a Docker engine answers on this machine")
    with ServiceStack("auto", workdir=workdir, env=base_env) as svc:
        assert svc.backend == "local"
        assert _scalar(svc.postgres_url, "SELECT 1") == 1


@pytest.mark.integration
def test_auto_falls_back_to_local_when_docker_probe_fails(
    base_env: dict[str, str], workdir: Path
) -> None:
    stack = ServiceStack(
        "auto", workdir=workdir, env=base_env, docker_probe=lambda env: _failing("docker")
    )
    with stack as svc:
        assert svc.backend == "local"


@pytest.mark.integration
def test_auto_falls_back_to_local_when_docker_start_fails(
    base_env: dict[str, str], workdir: Path, tmp_path: Path
) -> None:
    # The probe claims an engine; testcontainers then really fails to reach one.
    env = {**base_env, "DOCKER_HOST": f"unix://{tmp_path}/none.sock"}
    ok = ProbeResult("docker", True, "engine answered (injected)")
    with ServiceStack("auto", workdir=workdir, env=env, docker_probe=lambda e: ok) as svc:
        assert svc.backend == "local"


@pytest.mark.integration
def test_create_and_drop_database_helpers(workdir: Path, cache_home: Path) -> None:
    with LocalPostgres(workdir=workdir, cache_dir=cache_home / "ingest-harness") as pg:
        src = create_database(pg.admin_url, "src")
        assert src == pg.url("src")
        conn = psycopg2.connect(libpq_dsn(src))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        conn.close()
        copy = create_database(pg.admin_url, "copy", template="src")
        assert _scalar(copy, "SELECT x FROM t") == 42

        held = psycopg2.connect(libpq_dsn(copy))  # a session drop_database must end
        drop_database(pg.admin_url, "copy")
        assert not _database_exists(pg.admin_url, "copy")
        with pytest.raises(psycopg2.OperationalError), held.cursor() as cur:
            cur.execute("SELECT 1")
        held.close()
        drop_database(pg.admin_url, "copy")  # already gone: fine


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_port_race_is_retried_with_a_new_port(
    kind: str, workdir: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Someone else takes the picked port before the server binds it.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    ports = iter([taken])
    real_pick = _proc.pick_free_port
    monkeypatch.setattr(_proc, "pick_free_port", lambda: next(ports, None) or real_pick())
    server: LocalPostgres | LocalRedis
    if kind == "postgres":
        server = LocalPostgres(workdir=workdir, cache_dir=cache_home / "ingest-harness")
    else:
        server = LocalRedis(workdir=workdir)
    try:
        with server:
            assert server.port is not None and server.port != taken
    finally:
        squatter.close()
    assert list(workdir.iterdir()) == []


@pytest.mark.integration
def test_two_cold_starts_racing_for_the_cache_both_work(tmp_path: Path, workdir: Path) -> None:
    cache = tmp_path / "cache"
    servers = [LocalPostgres(workdir=workdir, cache_dir=cache) for _ in range(2)]
    errors: list[BaseException] = []

    def start(pg: LocalPostgres) -> None:
        try:
            pg.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(pg,)) for pg in servers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert [pg.from_template for pg in servers] == [False, False]  # both missed the cache
        # ...and both servers outlive the threads that started them (death signal per thread)
        time.sleep(0.2)
        for pg in servers:
            assert _scalar(pg.admin_url, "SELECT 1") == 1
    finally:
        for pg in servers:
            pg.stop()
    entries = [p.name for p in cache.iterdir()]  # one template, no half-built leftovers
    assert len(entries) == 1 and entries[0].startswith("pgtemplate-"), entries
    with LocalPostgres(workdir=workdir, cache_dir=cache) as third:
        assert third.from_template is True


@pytest.mark.integration
def test_server_started_in_a_short_lived_thread_outlives_it(workdir: Path) -> None:
    server = LocalRedis(workdir=workdir)
    thread = threading.Thread(target=server.start)
    thread.start()
    thread.join(30)
    try:
        time.sleep(0.2)  # a death signal tied to that thread would have fired by now
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping() is True
        finally:
            client.close()
    finally:
        server.stop()


def _fake_bin(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


@pytest.mark.integration
def test_failed_start_raises_with_server_log_and_cleans_up(workdir: Path) -> None:
    bindir = workdir / "fakebin"
    bindir.mkdir(mode=0o755)
    _fake_bin(bindir, "initdb", 'for a; do d="$a"; done; mkdir -p "$d"\n')
    _fake_bin(
        bindir,
        "postgres",
        'if [ "$1" = --version ]; then echo "postgres (PostgreSQL) 99.1"; exit 0; fi\n'
        'echo "FATAL:  the fake server refuses" >&2; exit 3\n',
    )
    pg = LocalPostgres(bindir=bindir, workdir=workdir, use_cache=False)
    with pytest.raises(ServiceStartError) as info:
        pg.start()
    assert "exited with code 3" in str(info.value)
    assert any("the fake server refuses" in line for line in info.value.log_tail)
    assert pg.pid is None and pg.base_dir is None
    assert [p.name for p in workdir.iterdir()] == ["fakebin"]


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="only root demotes postgres to another user")
def test_workdir_the_server_user_cannot_enter_is_a_clear_error(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ServiceStartError, match="cannot enter") as info:
        LocalPostgres(workdir=private, use_cache=False).start()
    assert "pass a workdir every user can enter" in str(info.value)
    assert list(private.iterdir()) == []


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_servers_die_when_the_process_that_started_them_is_killed(
    workdir: Path, cache_home: Path
) -> None:
    child_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from harness.services import ServiceStack\n"
        "env = {'PATH': '/usr/bin:/bin', 'XDG_CACHE_HOME': sys.argv[2]}\n"
        "ServiceStack('local', workdir=Path(sys.argv[1]), env=env).start()\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", child_code, str(workdir), str(cache_home)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        servers = _server_children(psutil.Process(child.pid))
        assert len(servers) >= 3  # postmaster + its helpers + redis-server
        stale_dirs = list(workdir.iterdir())
        assert len(stale_dirs) == 2
        child.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel can help
        child.wait(10)
        assert _wait_gone(servers, 5.0) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    # Its files on tmpfs are swept by the next start in the same workdir.
    with LocalRedis(workdir=workdir):
        assert not any(d.exists() for d in stale_dirs)


# --- external backend (the machine's own servers) ------------------------------------------------


@pytest.mark.integration
def test_external_creates_and_drops_its_own_database(base_env: dict[str, str]) -> None:
    env = {
        **base_env,
        "HARNESS_DATABASE_URL": MACHINE_PG,
        "HARNESS_REDIS_URL": MACHINE_REDIS,
        "PYTEST_XDIST_WORKER": "gw3",
    }
    stack = ServiceStack("external", env=env)
    with stack as svc:
        assert svc.backend == "external"
        name = svc.postgres_url.rsplit("/", 1)[1]
        assert name.startswith("ingest_gw3_") and name != "postgres"
        assert svc.postgres_admin_url == MACHINE_PG
        assert svc.redis_url == MACHINE_REDIS
        assert _database_exists(MACHINE_PG, name)
        assert _scalar(svc.postgres_url, "SELECT current_database()") == name
        assert svc.postgres_version and svc.redis_version
    assert not _database_exists(MACHINE_PG, name)

    with ServiceStack("external", env=env) as other:  # a second session gets its own
        assert other.postgres_url.rsplit("/", 1)[1] != name


@pytest.mark.integration
def test_external_url_password_is_masked_and_amqp_from_env(base_env: dict[str, str]) -> None:
    env = {
        **base_env,
        # trust auth ignores the password; it is here to be masked
        "HARNESS_DATABASE_URL": "postgresql://postgres:hunter2@127.0.0.1:5432/postgres",
        "HARNESS_REDIS_URL": MACHINE_REDIS,
        "HARNESS_AMQP_URL": "amqp://user:amqpsecret@127.0.0.1:5672/vhost",
    }
    with ServiceStack("external", env=env) as svc:
        assert svc.postgres_url.startswith("postgresql+psycopg2://postgres:hunter2@")
        assert svc.amqp_url == env["HARNESS_AMQP_URL"]
        text_ = svc.describe() + repr(svc)
        assert "hunter2" not in text_ and "amqpsecret" not in text_
        assert "postgres:***@127.0.0.1:5432" in text_


@pytest.mark.integration
def test_amqp_url_is_probed_when_not_given(base_env: dict[str, str]) -> None:
    env = {**base_env, "HARNESS_DATABASE_URL": MACHINE_PG, "HARNESS_REDIS_URL": MACHINE_REDIS}
    with ServiceStack("external", env=env) as svc:
        expected = (
            "amqp://guest:guest@127.0.0.1:5672//"
            if _proc.tcp_answers("127.0.0.1", 5672, 0.2)
            else None
        )
        assert svc.amqp_url == expected


@pytest.mark.integration
def test_external_unreachable_database_is_a_start_error(base_env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env: Mapping[str, str] = {
        **base_env,
        "HARNESS_DATABASE_URL": f"postgresql://postgres:pw@127.0.0.1:{port}/postgres",
        "HARNESS_REDIS_URL": MACHINE_REDIS,
    }
    with pytest.raises(ServiceStartError) as info:
        ServiceStack("external", env=env).start()
    assert f"127.0.0.1:{port}" in str(info.value) and ":pw@" not in str(info.value)
    assert isinstance(info.value, ServicesError)
