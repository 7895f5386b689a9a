"""The launcher of ``python -m app`` and ``make run``: the whole stack on one machine, to follow the
runbook by hand.

Postgres and Redis (from the harness's service layer), the migrations, a Celery worker, the
marketplace source, and the API and UI on http://127.0.0.1:8000. It prints the page's URL, a
fresh API token and the runbook's curl lines with that token filled in, then runs until Ctrl-C
(or SIGTERM) and stops all of it.

This is a developer launcher, not part of the service, so it lives here: ``app/__main__.py``
only hands its process over to this module, and the service never imports the harness. The
token is printed once, to the terminal, and never written to any log file.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Final, TextIO, get_args

from harness.core.cell import POOLS
from harness.core.target import TARGET_ENV, TargetError, default_target_spec, load_target
from harness.core.usage import OneLineParser
from harness.services import ServiceMode, ServicesError, mask_dsn
from harness.services._proc import tcp_answers
from harness.workers.http import ServerStartError
from harness.workers.loopmodes import LOOP_MODES
from harness.workers.process import WorkerStartError
from harness.workers.stack import (
    API_PART,
    MARKETPLACE_PART,
    FullStack,
    PortInUseError,
    check_port_free,
    runbook_curl_lines,
)

__all__ = ["main"]

DEFAULT_PORT: Final = 8000
DEFAULT_MARKETPLACE_PORT: Final = 8081
# How often the waiting launcher checks that the worker is still there.
_WATCH_S: Final = 0.5
_PROBE_TIMEOUT_S: Final = 1.0
_EXIT_INTERRUPTED: Final = 130


def _port(*, allow_zero: bool) -> Callable[[str], int]:
    """An argparse type: a TCP port number (0, any free port, where allowed)."""
    low = 0 if allow_zero else 1

    def port(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
        if not low <= number <= 65535:
            raise argparse.ArgumentTypeError(
                f"{number} is not a port number; use {low} to 65535"
                + (" (0: any free port)" if allow_zero else "")
            )
        return number

    return port


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m app",
        description="Start Postgres, Redis, the migrations, a Celery worker, the marketplace "
        "source and the API + UI on one machine, to follow the execute_ingest runbook by hand. "
        "Ctrl-C stops all of it.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="the API's address (127.0.0.1)")
    parser.add_argument(
        "--port",
        type=_port(allow_zero=False),
        default=DEFAULT_PORT,
        help=f"the API and UI's port ({DEFAULT_PORT})",
    )
    parser.add_argument(
        "--marketplace-port",
        type=_port(allow_zero=True),
        default=DEFAULT_MARKETPLACE_PORT,
        help=f"the marketplace source's port ({DEFAULT_MARKETPLACE_PORT}; 0: any free port)",
    )
    parser.add_argument(
        "--services",
        choices=get_args(ServiceMode),
        default="auto",
        help="where Postgres and Redis come from (auto: docker if an engine answers, else the "
        "local binaries, else HARNESS_DATABASE_URL / HARNESS_REDIS_URL)",
    )
    parser.add_argument(
        "--loop-mode",
        choices=LOOP_MODES,
        default=None,
        help="the event-loop condition the worker runs every task in (default: "
        "HARNESS_DEFAULT_LOOP_MODE, else no_loop)",
    )
    parser.add_argument("--pool", choices=POOLS, default="solo", help="the worker's pool")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="where the worker, API and stack logs go (default: a new ingest-run-* temp dir)",
    )
    return parser


class _Signals:
    """SIGINT and SIGTERM both mean "stop": the first one interrupts, later ones wait.

    While the stack is being stopped, another Ctrl-C must not abort the stop halfway (that
    would leave a worker or a server behind); it only says that stopping is under way.
    """

    def __init__(self, out: TextIO) -> None:
        self.stopping = False
        self._out = out

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.stopping:
            print("Still stopping; it takes a few seconds.", file=self._out, flush=True)
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)


def _log_to(log_dir: Path) -> Path:
    """The launcher's own lines (services, worker, stack) into stack.log; warnings also shown."""
    path = log_dir / "stack.log"
    harness_logger = logging.getLogger("harness")
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(
        logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.WARNING)
    to_terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    harness_logger.addHandler(to_file)
    harness_logger.addHandler(to_terminal)
    harness_logger.setLevel(logging.INFO)
    return path


def banner(stack: FullStack, stack_log: Path) -> str:
    """What a person needs to follow the runbook: URL, token, where the logs are, curl lines."""
    services = stack.services
    psql = "postgresql://" + mask_dsn(stack.database_url).split("://", 1)[1]
    list_line, run_line = runbook_curl_lines(stack.port, stack.token)
    start_line = (
        f'curl -X POST "http://localhost:{stack.port}/api/v1/projects/1/ingest/runs" \\\n'
        f'  -H "Authorization: Bearer {stack.token}" -H "Content-Type: application/json" \\\n'
        """  -d '{"job_code": "frontend_prices", "marketplace_code": "demo"}'"""
    )
    return f"""\
The ingestion stack is up (started in {stack.start_s or 0:.1f} s). Ctrl-C stops all of it.

  UI:          {stack.ui_url}
  API token:   {stack.token}
               (scope: every project; shown only here, never logged: paste it into the
               page's "Bearer token" field)

  Postgres:    {mask_dsn(stack.database_url)} ({services.backend}, {services.postgres_version})
  Redis:       {mask_dsn(services.redis_url)} ({services.redis_version})
  Marketplace: {stack.marketplace.url}
  Worker:      pid {stack.worker.pid}, pool {stack.pool}, loop mode {stack.loop_mode.value}
  Worker log:  {stack.worker.log_path}
  API log:     {stack.api_log_path}
  Stack log:   {stack_log}

Runbook step 2: open the UI, enter the token, pick frontend_prices, start. Or from a shell:

{start_line}

Step 3, the worker's lines:  tail -f {stack.worker.log_path}
Step 4, the SQL:             psql "{psql}"
Step 5, the API (replace :run_id with the id from the first call):

{list_line}

{run_line}
"""


def _servers_down(stack: FullStack) -> list[str]:
    """The stack's Postgres and Redis that no longer accept a connection, as words."""
    down = []
    for name, url in (("Postgres", stack.database_url), ("Redis", stack.services.redis_url)):
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (5432 if name == "Postgres" else 6379)
        if not tcp_answers(parts.hostname or "127.0.0.1", port, _PROBE_TIMEOUT_S):
            down.append(f"{name} at {mask_dsn(url)} no longer accepts connections")
    return down


def _wait(stack: FullStack, err: TextIO) -> int:
    """Until Ctrl-C/SIGTERM (KeyboardInterrupt); 1 if the worker, Postgres or Redis dies."""
    while True:
        time.sleep(_WATCH_S)  # a signal interrupts it (KeyboardInterrupt from _Signals)
        if not stack.worker.is_alive():
            print(
                f"The worker exited (code {stack.worker.returncode}); stopping the rest. "
                f"Its log: {stack.worker.log_path}",
                file=err,
                flush=True,
            )
            return 1
        down = _servers_down(stack)
        if down:
            print(
                "; ".join(down) + "; the stack cannot work without it, stopping the rest. "
                f"The logs: {stack.log_dir}",
                file=err,
                flush=True,
            )
            return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    signals = _Signals(err)
    signals.install()

    # The app's Target, as the suite names it (HARNESS_TARGET, else harness_target in the
    # working directory's pytest.ini), and every process started here gets the same one.
    try:
        spec = default_target_spec()
        target = load_target(spec)
    except TargetError as exc:
        print(f"python -m app: {exc}", file=err, flush=True)
        return 2
    os.environ[TARGET_ENV] = spec
    # The app's own settings (the API's and the worker's APP_*), before anything starts.
    problem = target.settings_problem()
    if problem is not None:
        print(f"python -m app: {problem}", file=err, flush=True)
        return 2

    stack: FullStack | None = None
    ready = False
    try:
        # Before anything else, so a taken port costs no temp dir and no half-started stack
        # (FullStack checks again, for its other callers).
        check_port_free(API_PART, args.host, args.port)
        check_port_free(MARKETPLACE_PART, args.host, args.marketplace_port)
        log_dir: Path = args.log_dir or Path(tempfile.mkdtemp(prefix="ingest-run-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        stack_log = _log_to(log_dir)
        stack = FullStack(
            services=args.services,
            host=args.host,
            port=args.port,
            marketplace_port=args.marketplace_port,
            pool=args.pool,
            loop_mode=args.loop_mode,
            log_dir=log_dir,
        )
        print(f"Starting the stack (logs in {log_dir}) ...", file=out, flush=True)
        stack.start()
        ready = True
        print(banner(stack, stack_log), file=out, flush=True)
        return _wait(stack, err)
    except KeyboardInterrupt:
        return 0 if ready else _EXIT_INTERRUPTED
    except PortInUseError as exc:
        option = "--marketplace-port" if exc.what == MARKETPLACE_PART else "--port"
        print(
            f"error: {exc}.\nStop whatever listens there, or pick another port with {option}, "
            f"e.g. `python -m app {option} {exc.port + 1}` "
            f"(`make run` passes RUN_ARGS: `make run RUN_ARGS='{option} {exc.port + 1}'`).",
            file=err,
            flush=True,
        )
        return 1
    except (ServicesError, WorkerStartError, ServerStartError) as exc:
        print(f"error: the stack did not start:\n{exc}", file=err, flush=True)
        return 1
    finally:
        signals.stopping = True
        if stack is not None:
            if ready:
                print("Stopping the worker, the servers and the services ...", file=out, flush=True)
            stack.stop()
            if ready:
                print(f"Stopped. Logs kept in {stack.log_dir}", file=out, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
