"""Postgres and Redis run from the locally installed binaries, on free loopback ports.

Each server is a plain context manager with its own temp dir (on tmpfs when there is one).
Postgres starts from a cached, already initdb'd cluster when one exists (a copy takes ~0.05 s
where initdb takes ~0.4 s); the first start builds that template and publishes it atomically.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self

import psycopg2
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from harness.core._lifecycle import StartStop
from harness.core.poll import poll_until
from harness.services import _proc
from harness.services._base import (
    ProbeResult,
    ServiceStartError,
    ServicesUnavailable,
    show_value,
)

_INSTALL_FIX = (
    "install the servers: `sudo apt-get install postgresql redis-server` (Debian/Ubuntu), "
    "`sudo dnf install postgresql-server redis` (Fedora) or `brew install postgresql redis` "
    "(macOS); or use Docker / an external server instead"
)
_BIND_FAILED = re.compile(
    r"could not bind|Address already in use|could not create any TCP/IP sockets", re.IGNORECASE
)
_PORT_ATTEMPTS = 5
_PG_STOP_TIMEOUT = 3.0
_REDIS_STOP_TIMEOUT = 3.0
# The dataset file a restart(keep_data=True) hands from the old server to the new one.
_REDIS_DUMP = "dump.rdb"
# unix-domain socket paths are limited to 107 bytes on Linux (104 on macOS), incl. the file name
_MAX_SOCKET_DIR = 80


# --- binaries ----------------------------------------------------------------------------------


def _path_dirs(env: Mapping[str, str]) -> list[Path]:
    return [Path(p) for p in env.get("PATH", os.defpath).split(os.pathsep) if p]


def _version_key(p: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", str(p))) or (0,)


def postgres_search_dirs(env: Mapping[str, str]) -> list[Path]:
    """Directories that may hold initdb + postgres, most preferred first."""
    patterns = [
        "/usr/lib/postgresql/*/bin",  # Debian / Ubuntu
        "/usr/pgsql-*/bin",  # PGDG RPMs
        "/opt/homebrew/opt/postgresql@*/bin",
        "/usr/local/opt/postgresql@*/bin",
    ]
    found: list[Path] = list(_path_dirs(env))
    for pattern in patterns:
        found.extend(sorted((Path(p) for p in glob.glob(pattern)), key=_version_key, reverse=True))
    found += [Path("/usr/local/pgsql/bin"), Path("/opt/homebrew/bin"), Path("/usr/local/bin")]
    return list(dict.fromkeys(found))


def redis_search_paths(env: Mapping[str, str]) -> list[Path]:
    """Candidate redis-server executables, most preferred first."""
    found = [d / "redis-server" for d in _path_dirs(env)]
    found += [
        Path(p) / "redis-server"
        for p in ("/usr/bin", "/usr/local/bin", "/usr/sbin", "/opt/homebrew/bin")
    ]
    return list(dict.fromkeys(found))


def _is_exe(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def find_postgres_bindir(env: Mapping[str, str], search: Sequence[Path] | None = None) -> Path:
    """The first directory holding both initdb and postgres; ServicesUnavailable if none."""
    dirs = list(search) if search is not None else postgres_search_dirs(env)
    for d in dirs:
        if _is_exe(d / "initdb") and _is_exe(d / "postgres"):
            # PATH often has symlinks (/usr/local/bin/postgres -> .../15/bin/postgres): use the
            # real bin dir, so both binaries and the cache key come from one installation.
            real = Path(os.path.realpath(d / "postgres")).parent
            return real if _is_exe(real / "initdb") else d
    raise ServicesUnavailable(
        "local",
        [
            ProbeResult(
                "local",
                False,
                "no directory holds both `initdb` and `postgres`; looked in: "
                + ", ".join(map(str, dirs)),
                _INSTALL_FIX,
            )
        ],
    )


def find_redis_server(env: Mapping[str, str], search: Sequence[Path] | None = None) -> Path:
    """The first executable redis-server; ServicesUnavailable if none."""
    paths = list(search) if search is not None else redis_search_paths(env)
    for p in paths:
        if _is_exe(p):
            return p
    raise ServicesUnavailable(
        "local",
        [
            ProbeResult(
                "local",
                False,
                "no `redis-server` executable; looked at: " + ", ".join(map(str, paths)),
                _INSTALL_FIX,
            )
        ],
    )


def probe_local(
    env: Mapping[str, str],
    *,
    pg_search: Sequence[Path] | None = None,
    redis_search: Sequence[Path] | None = None,
) -> ProbeResult:
    """Can the local backend work here? (both binaries present; run as root: a user to demote to)"""
    problems: list[str] = []
    found: list[str] = []
    for finder, search in ((find_postgres_bindir, pg_search), (find_redis_server, redis_search)):
        try:
            found.append(str(finder(env, search)))
        except ServicesUnavailable as exc:
            problems.extend(a.detail for a in exc.attempts)
    if problems:
        return ProbeResult("local", False, "; ".join(problems), _INSTALL_FIX)
    try:
        _proc.unprivileged_user()
    except RuntimeError as exc:
        return ProbeResult("local", False, str(exc), "create a `postgres` user or run as non-root")
    return ProbeResult("local", True, "found " + " and ".join(found))


@functools.lru_cache(maxsize=8)
def postgres_version(bindir: Path) -> str:
    """'15.20' from `postgres --version` (safe to run as root)."""
    out = subprocess.run(
        [os.fspath(bindir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    m = re.search(r"(\d+(?:\.\d+)+|\d+(?:beta|rc)\d+)", out)
    return m.group(1) if m else "unknown"


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME/ingest-harness (default ~/.cache/ingest-harness)."""
    base = env.get("XDG_CACHE_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "ingest-harness"


# --- Postgres ------------------------------------------------------------------------------------


class _PortTaken(Exception):
    """The server lost the race for its port; retry with another one."""


class _LocalServer(StartStop):
    """The lifecycle both local servers share: start once, clean up when the start fails.

    Subclasses set ``_proc`` in ``_start`` and make ``stop`` idempotent.
    """

    def __init__(
        self,
        *,
        workdir: Path | None,
        env: Mapping[str, str] | None,
        startup_timeout: float,
        log: logging.Logger | None,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        self._workdir = workdir
        self._startup_timeout = startup_timeout
        self._log = log or _proc.log
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self.port: int | None = None
        self.version = ""

    def start(self) -> Self:
        if self._proc is not None:
            return self
        _proc.track(self, self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def _stop_server(self, name: str, sig: signal.Signals, timeout: float, dir_label: str) -> None:
        """Stop the process (``sig``, then SIGKILL after ``timeout``), remove the temp dir."""
        # Claim each resource before releasing it, so a second (re-entrant, e.g. signal
        # handler) call finds nothing left to do instead of doing it twice.
        proc, self._proc = self._proc, None
        base, self._dir = self._dir, None
        self.port = None
        try:
            if proc is not None:
                _proc.terminate(proc, name, sig, timeout)
        except Exception:
            self._log.exception("error stopping %s (pid %d)", name, proc.pid if proc else -1)
        self._before_removing_dir()
        if base is not None:
            _proc.remove_tree(base, dir_label)
        _proc.untrack(self)

    def _before_removing_dir(self) -> None:
        """What a subclass must finish with the server down and its dir still there."""

    @staticmethod
    def _fail_if_exited(
        proc: subprocess.Popen[bytes],
        log_path: Path,
        *,
        server: str,
        before: str,
        port: int,
        checked: Iterable[str] = (),
    ) -> None:
        """While waiting for readiness: a server that exited lost its port (_PortTaken, to
        retry on another) or failed for a reason its log tells (ServiceStartError)."""
        if proc.poll() is None:
            return
        tail = _proc.read_tail(log_path)
        if any(_BIND_FAILED.search(line) for line in tail):
            raise _PortTaken
        raise ServiceStartError(
            f"{server} exited with code {proc.returncode} before {before} on 127.0.0.1:{port}",
            checked=checked,
            fix="read the server log lines below",
            log_tail=tail,
            log_path=log_path,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def base_dir(self) -> Path | None:
        """The temp dir holding the data, the logs and the socket; removed by stop()."""
        return self._dir


class LocalPostgres(_LocalServer):
    """A throwaway Postgres cluster (trust auth, user ``postgres``) on a free loopback port.

    ``with LocalPostgres() as pg: pg.admin_url`` -- start() cleans up after itself if it fails;
    stop() is idempotent and never raises.
    """

    INITDB_ARGS = ("-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C", "-U", "postgres")
    # Durability is pointless for a throwaway cluster. DSM segments go in the data dir (mmap)
    # rather than /dev/shm (posix) so a killed server leaves nothing outside its own dir.
    SERVER_SETTINGS = (
        "listen_addresses=127.0.0.1",
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
        "max_connections=200",
        "dynamic_shared_memory_type=mmap",
    )

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        workdir: Path | None = None,
        cache_dir: Path | None = None,
        use_cache: bool = True,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        log: logging.Logger | None = None,
    ) -> None:
        super().__init__(workdir=workdir, env=env, startup_timeout=startup_timeout, log=log)
        self._bindir = bindir
        self._cache_dir = cache_dir
        self._use_cache = use_cache
        self.from_template = False
        self.startup_seconds = 0.0
        self._publisher: threading.Thread | None = None

    # -- public --

    @property
    def admin_url(self) -> str:
        """``postgresql+psycopg2://postgres@127.0.0.1:PORT/postgres``."""
        if self.port is None:
            raise RuntimeError("LocalPostgres is not started")
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def log_path(self) -> Path | None:
        return self._dir / "postgres.log" if self._dir else None

    def url(self, database: str) -> str:
        return self.admin_url.rsplit("/", 1)[0] + "/" + database

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after a few seconds, remove the temp dir. Idempotent."""
        self._stop_server("postgres", signal.SIGINT, _PG_STOP_TIMEOUT, "postgres")

    def _before_removing_dir(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.join(_PUBLISH_WAIT)
            if publisher.is_alive():
                self._log.warning("still copying the template cache after %.0fs", _PUBLISH_WAIT)

    # -- internals --

    def _start(self) -> None:
        t0 = time.perf_counter()
        self.from_template = False
        bindir = self._bindir or find_postgres_bindir(self._env)
        run_as = _proc.unprivileged_user()
        workdir = self._workdir or _proc.default_workdir()
        try:
            base = _proc.make_instance_dir(workdir, "pg", run_as)
        except PermissionError as exc:
            raise ServiceStartError(
                f"cannot prepare a data directory for postgres under {workdir}: {exc}",
                fix="pass a workdir every user can enter (e.g. /dev/shm or /tmp), "
                "or run as a non-root user",
            ) from exc
        self._dir = base
        data = base / "data"
        version = postgres_version(bindir)
        template = self._template_path(bindir, version)
        if template is not None:
            _await_publication(template)  # one started earlier in this process
            if template.is_dir():
                self.from_template = self._copy_template(template, data, run_as)
        if not self.from_template:
            self._initdb(bindir, data, run_as)
            if template is not None:
                self._publish_in_background(data, template, workdir)
        self._run_server(bindir, base, data, run_as)
        self.startup_seconds = time.perf_counter() - t0
        self._log.info(
            "postgres %s on 127.0.0.1:%d (pid %s, %s) ready in %.2fs",
            self.version,
            self.port,
            self.pid,
            "from cached template" if self.from_template else "fresh initdb",
            self.startup_seconds,
        )

    def _template_path(self, bindir: Path, version: str) -> Path | None:
        if not self._use_cache:
            return None
        cache = self._cache_dir or default_cache_dir(self._env)
        # Same version from two installations, or changed initdb flags, must not share one.
        identity = repr((str(bindir.resolve()), self.INITDB_ARGS)).encode()
        key = hashlib.sha256(identity).hexdigest()[:8]
        return cache / f"pgtemplate-{version}-{key}"

    def _copy_template(self, template: Path, data: Path, run_as: _proc.RunAs | None) -> bool:
        try:
            shutil.copytree(template, data, symlinks=True)  # copy2: keeps the 0700 modes
            if run_as is not None:
                _proc.chown_tree(data, run_as.uid, run_as.gid)
        except OSError as exc:
            self._log.warning("cannot use cached cluster %s (%s); running initdb", template, exc)
            _proc.remove_tree(data, "a partial template copy")
            return False
        return True

    def _publish_in_background(self, data: Path, template: Path, workdir: Path) -> None:
        """Snapshot the fresh cluster (tmpfs: ~0.05 s) and copy it into the cache in a thread.

        The cache is usually on disk, where writing ~1000 files can take 0.5 s: the server need
        not wait for that. stop() (and so the atexit backstop) waits for the copy to finish.
        """
        # Named like an instance dir, so the sweep removes it if we are killed mid-copy.
        prefix = f"{_proc.DIR_PREFIX}{os.getpid()}-pg-tpl-"
        stage: Path | None = None
        try:
            stage = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
            shutil.copytree(data, stage / "data", symlinks=True)
        except OSError as exc:
            self._log.warning("could not snapshot the initdb'd cluster for the cache: %s", exc)
            if stage is not None:
                _proc.remove_tree(stage, "a template snapshot")
            return
        thread = threading.Thread(
            target=_publish_template,
            args=(stage, template, self._log),
            name=f"publish {template.name}",
            daemon=True,
        )
        _publishing[template] = thread
        self._publisher = thread
        thread.start()

    def _initdb(self, bindir: Path, data: Path, run_as: _proc.RunAs | None) -> None:
        assert self._dir is not None
        log_path = self._dir / "initdb.log"
        proc = _proc.spawn(
            [bindir / "initdb", *self.INITDB_ARGS, "-D", data],
            log_path=log_path,
            deathsig=signal.SIGKILL,
            run_as=run_as,
            cwd=self._dir,
        )
        try:
            rc = proc.wait(timeout=max(60.0, self._startup_timeout))
        except subprocess.TimeoutExpired:
            _proc.terminate(proc, "initdb", signal.SIGTERM, 1.0)
            rc = None
        if rc != 0:
            who = f" as user {run_as.name!r}" if run_as else ""
            raise ServiceStartError(
                f"initdb{who} failed ({'timed out' if rc is None else f'exit code {rc}'}) "
                f"creating {data}",
                checked=[f"binary: {bindir / 'initdb'}"],
                fix="see the initdb output above",
                log_tail=_proc.read_tail(log_path),
                log_path=log_path,
            )

    def _socket_dir(self, base: Path) -> str:
        # '' disables the unix socket (we only use TCP) when the path would be too long for it.
        return str(base) if len(str(base)) <= _MAX_SOCKET_DIR else ""

    def _run_server(self, bindir: Path, base: Path, data: Path, run_as: _proc.RunAs | None) -> None:
        log_path = base / "postgres.log"
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = _proc.pick_free_port()
            argv: list[str | os.PathLike[str]] = [bindir / "postgres", "-D", data, "-p", str(port)]
            argv += ["-k", self._socket_dir(base)]
            for setting in self.SERVER_SETTINGS:
                argv += ["-c", setting]
            self._proc = _proc.spawn(
                argv, log_path=log_path, deathsig=signal.SIGQUIT, run_as=run_as, cwd=base
            )
            self.port = port
            try:
                self.version = self._wait_ready(port, data, log_path)
                return
            except _PortTaken:
                proc, self._proc = self._proc, None
                _proc.terminate(proc, "postgres", signal.SIGINT, _PG_STOP_TIMEOUT)
                self._log.info(
                    "postgres lost port %d to another process (attempt %d)", port, attempt
                )
        raise ServiceStartError(
            f"postgres could not bind a free loopback port in {_PORT_ATTEMPTS} attempts",
            log_tail=_proc.read_tail(log_path),
            log_path=log_path,
            fix="something is grabbing ports quickly; retry",
        )

    def _wait_ready(self, port: int, data: Path, log_path: Path) -> str:
        """Poll every 10 ms until a real connection works; return the server version.

        Connections are only tried once postmaster.pid says "ready" (what pg_ctl -w reads):
        a port squatter that accepts but never answers would otherwise cost libpq's minimum
        2 s connect timeout, and each early attempt logs a "starting up" FATAL.
        """
        assert self._proc is not None
        proc = self._proc
        last_error = ""

        def check() -> str | None:
            nonlocal last_error
            self._fail_if_exited(
                proc,
                log_path,
                server="postgres",
                before="accepting connections",
                port=port,
                checked=[f"data dir: {data}"],
            )
            if _pidfile_status(data) not in ("ready", None):
                return None
            try:
                conn = psycopg2.connect(
                    host="127.0.0.1",
                    port=port,
                    user="postgres",
                    dbname="postgres",
                    connect_timeout=2,
                )
            except psycopg2.OperationalError as exc:
                last_error = str(exc).strip()
                return None
            try:
                with conn.cursor() as cur:
                    cur.execute("SHOW data_directory")
                    served = show_value(cur.fetchone())
                    cur.execute("SHOW server_version")
                    version: str = show_value(cur.fetchone())
            finally:
                conn.close()
            if os.path.realpath(served) != os.path.realpath(data):
                raise _PortTaken  # another postgres answered on "our" port
            return version

        version = poll_until(check, timeout=self._startup_timeout)
        if version is None:
            raise ServiceStartError(
                f"postgres did not accept connections on 127.0.0.1:{port} "
                f"within {self._startup_timeout:.0f}s",
                checked=[f"last connection error: {last_error or 'none'}", f"data dir: {data}"],
                fix="the machine may be overloaded; read the server log lines below",
                log_tail=_proc.read_tail(log_path),
                log_path=log_path,
            )
        return version


def _pidfile_status(data: Path) -> str | None:
    """postmaster.pid's status ('starting', 'ready', ...); '' before it exists; None: unreadable."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return ""
    except OSError:
        return None  # cannot tell: let the connection attempt decide
    return lines[7].strip() if len(lines) >= 8 else ""


# Template publications in flight in this process, so a second start waits for the first
# one's copy instead of running initdb again.
_publishing: dict[Path, threading.Thread] = {}
_PUBLISH_WAIT = 60.0


def _await_publication(template: Path) -> None:
    thread = _publishing.get(template)
    if thread is not None:
        thread.join(_PUBLISH_WAIT)


def _publish_template(stage: Path, template: Path, log: logging.Logger) -> None:
    """Copy `stage`/data into the cache; the rename makes it appear whole or not at all."""
    tmp = template.parent / f".{template.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        _proc.sweep_stale_dirs(template.parent)
        shutil.copytree(stage / "data", tmp, symlinks=True)
        os.rename(tmp, template)
    except OSError as exc:
        if not template.is_dir():
            log.warning("could not cache the initdb'd cluster at %s: %s", template, exc)
        # else: another process published it first; theirs is as good as ours
        _proc.remove_tree(tmp, "an unpublished template")
    else:
        log.info("cached an initdb'd cluster at %s", template)
    finally:
        _proc.remove_tree(stage, "a template snapshot")
        _publishing.pop(template, None)


# --- Redis ---------------------------------------------------------------------------------------


class LocalRedis(_LocalServer):
    """A throwaway redis-server (no persistence) on a free loopback port."""

    def __init__(
        self,
        *,
        server: Path | None = None,
        workdir: Path | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 15.0,
        log: logging.Logger | None = None,
    ) -> None:
        super().__init__(workdir=workdir, env=env, startup_timeout=startup_timeout, log=log)
        self._server = server

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        if self.port is None:
            raise RuntimeError("LocalRedis is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """SIGTERM, SIGKILL after a few seconds, remove the temp dir. Idempotent, never raises."""
        self._stop_server("redis-server", signal.SIGTERM, _REDIS_STOP_TIMEOUT, "redis")

    def restart(self, *, keep_data: bool = True, down_for: float = 0.0) -> float:
        """Stop the server and start a new one on the same port and dir; return the downtime (s).

        What a person's ``systemctl restart redis`` does to the clients: every connection is
        closed, and whoever reconnects to the same URL finds the new server. With ``keep_data``
        the old server saves its dataset on the way down (``SHUTDOWN SAVE``) and the new one
        loads it from the dir, as a Redis with persistence keeps its queues across a restart;
        without, the new server starts empty (``--save ""`` is how this one is configured).
        ``down_for`` keeps it down that many seconds before the new one starts (an outage).

        Call it from a thread that outlives the server, as ``start()`` (the new process's death
        signal). If the new server cannot start (the port was taken in between: the URL cannot
        change, clients have it), raise ServiceStartError and leave this LocalRedis stopped.
        """
        proc, port, base = self._proc, self.port, self._dir
        if proc is None or port is None or base is None:
            raise RuntimeError("LocalRedis is not started; restart() needs a running server")
        down_at = time.perf_counter()
        self._shut_down(proc, port, save=keep_data)
        if not keep_data:
            # A dump left by an earlier restart(keep_data=True) would be loaded again.
            (base / _REDIS_DUMP).unlink(missing_ok=True)
        if down_for > 0:
            time.sleep(down_for)  # the outage itself: nothing to wait for but the clock
        server = self._server or find_redis_server(self._env)
        log_path = base / "redis.log"
        try:
            self._proc = _proc.spawn(
                self._argv(server, port, base, log_path),
                log_path=log_path,
                deathsig=signal.SIGKILL,
                cwd=base,
            )
            self.version = self._wait_ready(port, log_path)
        except _PortTaken:
            self.stop()
            raise ServiceStartError(
                f"redis-server could not restart on 127.0.0.1:{port}: another process took "
                "the port while it was down",
                log_tail=_proc.read_tail(log_path),
                log_path=log_path,
                fix="retry; clients keep the URL, so the port cannot change on a restart",
            ) from None
        except BaseException:
            self.stop()
            raise
        downtime = time.perf_counter() - down_at
        self._log.info(
            "redis restarted on 127.0.0.1:%d (pid %s, %s) after %.3fs down",
            port,
            self.pid,
            "dataset kept" if keep_data else "empty",
            downtime,
        )
        return downtime

    def _shut_down(self, proc: subprocess.Popen[bytes], port: int, *, save: bool) -> None:
        if save:
            client = redis.Redis(
                host="127.0.0.1",
                port=port,
                socket_connect_timeout=_REDIS_STOP_TIMEOUT,
                socket_timeout=_REDIS_STOP_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                # redis-py treats the connection the server drops on its way out as success.
                client.shutdown(save=True)
            finally:
                client.close()
        # Reaped either way, so that the next spawn() is the only process of ours on the port;
        # after SHUTDOWN the SIGTERM finds it gone (or makes sure of it).
        _proc.terminate(proc, "redis-server", signal.SIGTERM, _REDIS_STOP_TIMEOUT)
        self._proc = None

    @staticmethod
    def _argv(server: Path, port: int, base: Path, log_path: Path) -> list[str | os.PathLike[str]]:
        return [
            server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", base, "--dbfilename", _REDIS_DUMP,
            "--daemonize", "no", "--logfile", log_path,
        ]  # fmt: skip

    def _start(self) -> None:
        t0 = time.perf_counter()
        server = self._server or find_redis_server(self._env)
        base = _proc.make_instance_dir(self._workdir or _proc.default_workdir(), "redis", None)
        self._dir = base
        log_path = base / "redis.log"
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = _proc.pick_free_port()
            argv = self._argv(server, port, base, log_path)
            self._proc = _proc.spawn(argv, log_path=log_path, deathsig=signal.SIGKILL, cwd=base)
            self.port = port
            try:
                self.version = self._wait_ready(port, log_path)
                break
            except _PortTaken:
                proc, self._proc = self._proc, None
                _proc.terminate(proc, "redis-server", signal.SIGTERM, _REDIS_STOP_TIMEOUT)
                self._log.info("redis lost port %d to another process (attempt %d)", port, attempt)
        else:
            raise ServiceStartError(
                f"redis-server could not bind a free loopback port in {_PORT_ATTEMPTS} attempts",
                log_tail=_proc.read_tail(log_path),
                log_path=log_path,
                fix="something is grabbing ports quickly; retry",
            )
        self._log.info(
            "redis %s on 127.0.0.1:%d (pid %s) ready in %.3fs",
            self.version,
            port,
            self.pid,
            time.perf_counter() - t0,
        )

    def _wait_ready(self, port: int, log_path: Path) -> str:
        assert self._proc is not None
        proc = self._proc
        last_error = ""

        def check() -> str | None:
            nonlocal last_error
            self._fail_if_exited(
                proc, log_path, server="redis-server", before="answering PING", port=port
            )
            # No retries: redis-py's default backoff could sleep past our deadline, and this
            # loop is the retry. Short timeouts: whatever squats on a loopback port answers fast
            # or never.
            client = redis.Redis(
                host="127.0.0.1",
                port=port,
                socket_connect_timeout=0.5,
                socket_timeout=0.5,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                client.ping()
                info = client.info("server")
            except redis.RedisError as exc:
                last_error = str(exc)
                return None
            finally:
                client.close()
            if int(info.get("process_id", -1)) != proc.pid:
                raise _PortTaken  # another redis answered on "our" port
            return str(info.get("redis_version", "unknown"))

        version = poll_until(check, timeout=self._startup_timeout)
        if version is None:
            raise ServiceStartError(
                f"redis-server did not answer PING on 127.0.0.1:{port} "
                f"within {self._startup_timeout:.0f}s",
                checked=[f"last error: {last_error or 'none'}"],
                fix="the machine may be overloaded; read the server log lines below",
                log_tail=_proc.read_tail(log_path),
                log_path=log_path,
            )
        return version
