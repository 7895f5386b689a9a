"""``make run`` (``python -m app``) tried as a new user would, and the ``FullStack`` behind it.

The launcher runs as a real subprocess: its banner is read from stdout, a run is started over
HTTP as the page does, the runbook's curl lines printed in the banner are sent with httpx, and
Ctrl-C (SIGINT) or SIGTERM must stop every process it started.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
import psycopg2
import pytest

from harness.pytest.plugin import harness_config_key
from harness.services import Services
from harness.services._base import libpq_dsn
from harness.workers.process import WorkerStartError
from harness.workers.stack import FullStack, PortInUseError, runbook_curl_lines
from scenarios.runbook.runbook import (
    STEP5_CURL_LIST,
    STEP5_CURL_RUN,
    assert_runbook_run_json,
    curl_for,
    parse_curl,
)

pytestmark = pytest.mark.integration

BANNER_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 30.0
# The stop takes ~3 s here (worker warm shutdown, then Postgres and Redis).
EXIT_TIMEOUT_S = 15.0
UI_LINE = re.compile(r"^\s*UI:\s+(?P<url>http://\S+)$", re.MULTILINE)
TOKEN_LINE = re.compile(r"^\s*API token:\s+(?P<token>\S+)$", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LaunchedApp:
    """``python -m app`` in its own session, its stdout and stderr collected by two threads."""

    def __init__(self, args: list[str], log_dir: Path) -> None:
        self.log_dir = log_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", *args, "--log-dir", str(log_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._out: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stdout = ""
        self.stderr_lines: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out.put)),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines.append)),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream: IO[str], sink: Any) -> None:
        for line in stream:
            sink(line)
        stream.close()

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def read_until(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Read stdout until ``pattern`` matches it; fail with both streams at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            found = pattern.search(self.stdout)
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self._out.empty()):
                pytest.fail(
                    f"python -m app did not print {pattern.pattern!r} "
                    f"(exit code {self.proc.poll()}).\nstdout:\n{self.stdout}\n"
                    f"stderr:\n{self.stderr}",
                    pytrace=False,
                )
            try:
                self.stdout += self._out.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(5)
        while not self._out.empty():
            self.stdout += self._out.get()
        return code

    def kill(self) -> None:
        """Last resort for a failed test: the whole session (it is its own)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait(10)


@pytest.fixture
def launch(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start ``python -m app`` with the session's ``--services`` mode; killed if still running."""
    services_mode = request.config.stash[harness_config_key].services
    launched: list[LaunchedApp] = []

    def start(*args: str) -> LaunchedApp:
        log_dir = tmp_path / f"run-{len(launched)}"
        app = LaunchedApp([*args, "--services", services_mode], log_dir)
        launched.append(app)
        return app

    yield start
    for app in launched:
        app.kill()


def started_children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:
            out.append(f"{proc.pid} (gone)")
    return out


def assert_all_gone(children: list[psutil.Process]) -> None:
    # wait_procs also treats a reaped-by-init zombie as gone.
    _, alive = psutil.wait_procs(children, timeout=5)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes python -m app started are still running: {describe(alive)}"


def read_banner(app: LaunchedApp) -> tuple[int, str, str]:
    """(port, UI URL, token) from the banner, once all of it (the last curl line) is out."""
    app.read_until(
        re.compile(r'runs/:run_id" \\\n  -H "Authorization: Bearer \S+"\n'), BANNER_TIMEOUT_S
    )
    ui = UI_LINE.search(app.stdout)
    token = TOKEN_LINE.search(app.stdout)
    assert ui is not None and token is not None, app.stdout
    port_match = re.match(r"http://127\.0\.0\.1:(\d+)/", ui["url"])
    assert port_match is not None, ui["url"]
    return int(port_match.group(1)), ui["url"], token["token"]


# -- make run, as a new user -----------------------------------------------------------------


def test_make_run_follows_the_runbook_and_ctrl_c_stops_everything(launch: Any) -> None:
    port = free_port()
    # The marketplace on any free port: 8081 may be taken by a person's `make run`.
    app = launch("--port", str(port), "--marketplace-port", "0")
    banner_port, ui_url, token = read_banner(app)

    assert banner_port == port
    assert ui_url == f"http://127.0.0.1:{port}/projects/1/ingestion"
    # The banner's step-5 lines are the runbook's, with this port and the token filled in.
    list_curl = curl_for(STEP5_CURL_LIST, port=port, token=token)
    run_curl = curl_for(STEP5_CURL_RUN, port=port, token=token)
    assert list_curl in app.stdout and run_curl in app.stdout, app.stdout
    assert (list_curl, run_curl) == runbook_curl_lines(port, token)

    with httpx.Client(timeout=10.0) as client:
        # The page a person opens.
        page = client.get(ui_url)
        assert page.status_code == 200 and 'data-testid="start-button"' in page.text
        # Start a run as the page's script does.
        created = client.post(
            f"http://localhost:{port}/api/v1/projects/1/ingest/runs",
            headers={"Authorization": f"Bearer {token}"},
            json={"job_code": "frontend_prices", "marketplace_code": "demo"},
        )
        assert created.status_code == 202, created.text
        run_id = created.json()["id"]

        # Wait with the runbook's first call, then make its second.
        latest_call = parse_curl(list_curl)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            latest = client.request(
                latest_call.method, latest_call.url, headers=latest_call.headers
            )
            assert latest.status_code == 200, latest.text
            body = latest.json()
            assert [run["id"] for run in body] == [run_id], body
            if body[0]["status"] in ("success", "failed"):
                break
            assert time.monotonic() < deadline, f"run {run_id} is still {body[0]['status']}"
            time.sleep(0.1)
        one_call = parse_curl(curl_for(STEP5_CURL_RUN, port=port, token=token, run_id=run_id))
        one = client.request(one_call.method, one_call.url, headers=one_call.headers)
    assert one.status_code == 200, one.text
    assert_runbook_run_json(one.json(), run_id=run_id)
    assert body == [one.json()]

    children = started_children(app.proc.pid)
    names = describe(children)
    assert any("postgres" in n for n in names), names
    assert any("redis-server" in n for n in names), names
    assert any("celery" in n for n in names), names

    started = time.monotonic()
    app.proc.send_signal(signal.SIGINT)
    assert app.wait(EXIT_TIMEOUT_S) == 0, app.stderr
    took = time.monotonic() - started
    assert took < EXIT_TIMEOUT_S
    assert "Stopped." in app.stdout
    assert_all_gone(children)
    # Printed to the terminal, never written to a log.
    logs = sorted(app.log_dir.iterdir())
    assert {p.name for p in logs} >= {"api.log", "stack.log"}, logs
    assert any(p.name.startswith("worker-") for p in logs), logs
    for log in logs:
        assert token not in log.read_text(encoding="utf-8"), f"the token is in {log}"
    assert token not in app.stderr


def test_sigterm_stops_everything_too(launch: Any) -> None:
    app = launch("--port", str(free_port()), "--marketplace-port", "0")
    read_banner(app)
    children = started_children(app.proc.pid)
    assert children

    app.proc.send_signal(signal.SIGTERM)

    assert app.wait(EXIT_TIMEOUT_S) == 0, app.stderr
    assert_all_gone(children)


@pytest.mark.parametrize("server", ["redis-server", "postgres"])
def test_a_dead_server_is_announced_and_everything_stops_quietly(launch: Any, server: str) -> None:
    app = launch("--port", str(free_port()), "--marketplace-port", "0")
    read_banner(app)
    backend = re.search(r"Postgres: .* \((\w+), ", app.stdout)
    assert backend is not None, app.stdout
    if backend.group(1) != "local":
        pytest.skip(f"kills the stack's own server processes; this stack is {backend.group(1)}")
    children = started_children(app.proc.pid)
    victims = [p for p in children if p.name() == server]
    assert victims, f"no {server} among the stack's processes: {describe(children)}"
    # The server's own main process (Postgres: the postmaster, the oldest of its processes).
    victim = min(victims, key=lambda p: p.create_time())

    victim.kill()

    assert app.wait(EXIT_TIMEOUT_S) == 1, app.stderr
    name = "Redis" if server == "redis-server" else "Postgres"
    assert f"{name} at " in app.stderr and "no longer accepts connections" in app.stderr, app.stderr
    assert "Traceback" not in app.stderr + app.stdout, app.stderr
    assert_all_gone(children)


def test_a_taken_port_fails_at_once_naming_the_option(launch: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        app = launch("--port", str(port), "--marketplace-port", "0")

        code = app.wait(30)

    assert code == 1
    assert f"127.0.0.1:{port}" in app.stderr
    assert "already in use" in app.stderr
    assert f"--port {port + 1}" in app.stderr, app.stderr
    # Refused before Postgres, Redis or a worker were started: the launcher prints "Starting
    # the stack" before it starts anything. (No bound on the time: on a loaded machine the
    # interpreter's imports alone took 8 s; timing goals live in bench/.)
    assert "Starting the stack" not in app.stdout


# -- the stack behind it ---------------------------------------------------------------------


def database_exists(services: Services, name: str) -> bool:
    conn = psycopg2.connect(libpq_dsn(services.postgres_admin_url))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


def test_a_stack_that_fails_halfway_stops_what_it_started(
    services: Services, tmp_path: Path
) -> None:
    name = f"stack_fail_{secrets.token_hex(4)}"
    marketplace_port = free_port()
    stack = FullStack(
        services=services,
        database=name,
        marketplace_port=marketplace_port,
        pool="no-such-pool",  # celery refuses it: the worker never answers a ping
        log_dir=tmp_path,
    )

    with pytest.raises(WorkerStartError, match="did not start"):
        stack.start()

    # The database it created is dropped, the marketplace it started no longer listens.
    assert not database_exists(services, name)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", marketplace_port), timeout=1).close()
    stack.stop()  # idempotent after a failed start


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        # No services may be needed to find out: an unusable mode proves nothing was tried.
        stack = FullStack(services="external", env={}, port=port, log_dir=tmp_path)

        with pytest.raises(PortInUseError, match=rf"127\.0\.0\.1:{port}.*already in use"):
            stack.start()


def test_the_stack_never_shows_its_token(services: Services, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(16)
    stack = FullStack(services=services, tokens={token: "*"}, log_dir=tmp_path)
    assert stack.token == token
    assert token not in repr(stack)
    with pytest.raises(ValueError) as caught:
        FullStack(services=services, tokens={f"{token};x": "*"})
    assert token not in str(caught.value)
