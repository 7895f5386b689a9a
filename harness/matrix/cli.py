"""The ``harness`` command: ``harness matrix`` runs the scenarios over the loop-mode x pool x
broker matrix and reports per cell; ``harness flake`` runs that matrix N times and lists every
non-pass. Exit codes: 0 every selected cell passed, 1 something did not, 2 it could not run,
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from harness.core.cell import BROKERS, MATRIX_MODES, POOLS, RUNNERS
from harness.core.config import ConfigError, HarnessConfig
from harness.core.errors import UsageError
from harness.core.pythons import PYTHON_ENV, SEARCHED, find_interpreter, parse_versions
from harness.core.shard import SHARD_ENV
from harness.matrix.facts import served_by, versions
from harness.matrix.html import render_flake_html
from harness.matrix.junit import write_junit
from harness.matrix.markdown import STEP_SUMMARY_ENV, publish_text, render_flake_markdown
from harness.matrix.merge import MergeError, find_reports, merge
from harness.matrix.publish import REPORT_ENV, junit_beside, publish
from harness.matrix.report import (
    EXIT_ERROR,
    EXIT_NOT_PASSED,
    EXIT_OK,
    MatrixCollector,
    MatrixResult,
    label_of,
    render_details,
    render_table,
    verdict_word,
    write_atomic,
    write_json,
)
from harness.services import DockerImages, Services, ServicesError, ServiceStack
from harness.services._compose import (
    COMPOSE_FILE,
    COMPOSE_PROJECT,
    compose_down,
    compose_file,
    compose_up,
    endpoints,
    project_name,
    require_engine,
)
from harness.workers.forkserver import prestart_fork_server

__all__ = ["build_parser", "main"]

DEFAULT_SCENARIOS: Final = "scenarios"
DEFAULT_MATRIX_REPORT: Final = "reports/matrix.json"
DEFAULT_FLAKE_REPORT: Final = "reports/flake.json"
DEFAULT_FLAKE_RUNS: Final = 20
DEFAULT_STRESS_REPORT: Final = "reports/stress.json"
DEFAULT_STRESS_RUNS: Final = 10
# What `harness stress` adds to the matrix: the fault scenarios (not the runbook's browser
# tests, nor the pre-fix proof, which runs a matrix of its own).
_STRESS_PYTEST_ARGS: Final = (
    "-m",
    "matrix or integration",
    "--ignore=scenarios/runbook",
    "--ignore=scenarios/test_prefix_runner.py",
)
_LOG_TAIL_STRESS: Final = 40
_NUMPROCESSES: Final = re.compile(r"\d+|auto|logical|fit")
# Measured (docs/benchmarks.md, issue 14): xdist's two extra pytest processes cost ~0.7 s; the
# default 17 cells ran in 3.9 s with -n 0 and 4.6 s with -n 2, 22 cells equal, 43 cells in
# 10.2 s with -n 0 and 8.4 s with -n 2.
FIT_IN_PROCESS_CELLS: Final = 24
_LOG_TAIL_LINES: Final = 30
_FLAKE_MESSAGE_LINES: Final = 3
EXIT_INTERRUPTED: Final = 130  # as a shell reports SIGINT

_SCHEMA_HELP: Final = """\
reports/matrix.json:
  {"generated_at", "selected": {loop_modes, pools, brokers, services},
   "versions": {python, celery, kombu, sqlalchemy, postgres, redis},
   "cells": [{"loop_mode", "pool", "broker",
              "status": pass|fail|skipped|interrupted|not_run,
              "scenarios", "passed", "failed", "skipped", "median_run_ms",
              "failures": [{"test", "message"}], "skip_reason"}],
   "errors": [...], "tests": [{"test", "loop_mode", "pool", "broker", "outcome", "message",
   "duration_s", "run_durations_ms", "celery_worker"}], "pytest_exit_code", "exit_code"}

reports/flake.json (harness flake):
  {"generated_at", "runs", "completed_runs", "selected", "versions",
   "run_results": [{"run", "exit_code", "passed", "failed", "skipped", "cells",
                    "cells_passed", "duration_s", "report", "log"}],
   "non_passes": [{"run", "loop_mode", "pool", "broker", "test", "outcome", "message"}],
   "exit_code"}
  each run is a fresh `harness matrix` process; its report and output are kept in
  reports/flake-runs/run-NN.{json,log}.

exit codes: 0 every selected cell passed; 1 a cell failed, was skipped or ran nothing;
2 the matrix could not run (bad option, services unavailable, no scenario collected,
collection error, pytest usage error or interruption inside pytest); 130 interrupted.

Arguments after `--` go to pytest unchanged, after the harness's own (so `-- -m "..."`
replaces the default `-m matrix`). -k narrows scenarios, not cells: a cell with no scenario
left is "not_run"; narrow cells with --loop-mode/--pool/--broker.
"""


class UsageProblem(UsageError):
    """A command-line value the harness cannot use; the message names the fix."""


# -- options --------------------------------------------------------------------------------


def _add_common(
    parser: argparse.ArgumentParser, *, default_report: str, beside_report: str
) -> None:
    cells = parser.add_argument_group("matrix cells (same names and values as the pytest plugin)")
    cells.add_argument(
        "--loop-mode",
        metavar="MODES",
        help="comma-separated or 'all': " + ", ".join(MATRIX_MODES) + " (default: all)",
    )
    cells.add_argument(
        "--pool",
        metavar="POOLS",
        help="comma-separated or 'all': " + ", ".join(POOLS) + " (default: prefork,solo,threads)",
    )
    cells.add_argument(
        "--broker",
        metavar="BROKERS",
        help="comma-separated or 'all': " + ", ".join(BROKERS) + " (default: redis)",
    )
    cells.add_argument(
        "--shard",
        metavar="K/N",
        help="run shard K of N of the selected cells (deterministic, split by pool and broker "
        f"where it can; or {SHARD_ENV}); `harness report merge` joins the shards' reports",
    )
    run = parser.add_argument_group("running")
    run.add_argument(
        "--services",
        metavar="MODE",
        help="where Postgres and Redis come from: auto|docker|local|external|compose (default: "
        "auto, or HARNESS_SERVICES); started once here and shared with every pytest worker",
    )
    run.add_argument(
        "--postgres-image",
        metavar="IMAGE",
        help="the Postgres image of the docker backend (default: postgres:16-alpine, or "
        "HARNESS_POSTGRES_IMAGE)",
    )
    run.add_argument(
        "--redis-image",
        metavar="IMAGE",
        help="the Redis image of the docker backend (default: redis:7-alpine, or "
        "HARNESS_REDIS_IMAGE)",
    )
    run.add_argument(
        "--runner",
        metavar="RUNNER",
        help="the run_async_safe the workers use: "
        + "|".join(RUNNERS)
        + " (default: fixed; prefix injects the pre-fix plain asyncio.run(), so the running_* "
        "cells must fail: the harness proving it detects the runbook's bug)",
    )
    run.add_argument(
        "--fork-server",
        metavar="on|off",
        help="on (the default): fork the solo, threads and prefork workers from a process that "
        "has imported Celery and the Target's worker_preload, started before pytest; off: "
        "exec each worker",
    )
    run.add_argument(
        "--python",
        metavar="VERSIONS",
        help="CPython versions the Celery workers run on, comma-separated (e.g. 3.11,3.12,3.13; "
        "default: this interpreter, or HARNESS_PYTHON): the matrix once per version, each in a "
        "venv of its own built once; a version not found here has its cells skipped",
    )
    run.add_argument(
        "--no-services",
        action="store_true",
        help="do not start services here; pytest gets --services as given (for tests of the "
        "harness itself, or when HARNESS_*_URL already point at running servers)",
    )
    run.add_argument(
        "-n",
        "--numprocesses",
        default="fit",
        metavar="N",
        help="pytest-xdist workers: a number, 'auto' or 'logical'; 0 runs in this process; "
        f"'fit' (the default): 0 for up to {FIT_IN_PROCESS_CELLS} cells, where two more "
        "pytest processes cost more than they split, else 'auto' (docs/benchmarks.md)",
    )
    run.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k expression")
    run.add_argument(
        "--scenarios",
        default=DEFAULT_SCENARIOS,
        metavar="PATH",
        help=f"the scenarios to run (default: {DEFAULT_SCENARIOS})",
    )
    run.add_argument(
        "--report",
        default=default_report,
        type=Path,
        metavar="PATH",
        help=f"where to write the JSON report (default: {default_report}); {beside_report}",
    )
    run.add_argument(
        "--junit",
        type=Path,
        metavar="PATH",
        help="where to write the JUnit XML report (default: <report>-junit.xml beside --report)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Run the ingest scenarios over the loop-mode x pool x broker matrix.",
        epilog=_SCHEMA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    matrix = commands.add_parser(
        "matrix",
        help="run the matrix once: progress, a table, reports/matrix.json",
        description="Start the services, run the scenarios over the selected cells, print a "
        "table and write a JSON report. Usage: harness matrix [options] [-- pytest args]",
        epilog=_SCHEMA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(
        matrix,
        default_report=DEFAULT_MATRIX_REPORT,
        beside_report="pytest's own output goes next to it as <name>-pytest.log",
    )
    flake = commands.add_parser(
        "flake",
        help="run the matrix N times in a row and list every non-pass",
        description="Start the services once, run `harness matrix` N times (each in a fresh "
        "process), print a line per run, then every non-pass with its run, cell and test; "
        "writes reports/flake.json. Exit 0 only if there was none.",
        epilog=_SCHEMA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(
        flake,
        default_report=DEFAULT_FLAKE_REPORT,
        beside_report="each run's report and output go to <name>-runs/run-NN.{json,log}",
    )
    flake.add_argument(
        "--runs",
        type=int,
        default=DEFAULT_FLAKE_RUNS,
        metavar="N",
        help=f"how many times to run the matrix (default: {DEFAULT_FLAKE_RUNS})",
    )
    stress = commands.add_parser(
        "stress",
        help="the matrix and the fault scenarios N times, under a CPU hog; list every non-pass",
        description="As `harness flake`, with the fault scenarios too (scenarios/faults), while "
        "a CPU hog of the harness's own keeps every core busy (--no-hog: without it). Each "
        "non-pass is listed with its run, test and the tail of that run's pytest output, "
        "which holds the worker logs of a failed test. Writes reports/stress.json.",
        epilog=_SCHEMA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(
        stress,
        default_report=DEFAULT_STRESS_REPORT,
        beside_report="each run's report and output go to <name>-runs/run-NN.{json,log}",
    )
    stress.add_argument(
        "--runs",
        type=int,
        default=DEFAULT_STRESS_RUNS,
        metavar="N",
        help=f"how many times to run it (default: {DEFAULT_STRESS_RUNS})",
    )
    stress.add_argument(
        "--no-hog", dest="hog", action="store_false", help="do not load the CPUs meanwhile"
    )
    report = commands.add_parser(
        "report",
        help="work with reports: `harness report merge DIR...` joins the shards of a matrix",
        description="merge: read the JSON reports of the shards of one matrix (directories "
        "are searched for matrix*.json), print the table and write one JSON, JUnit XML, HTML "
        "and Markdown report. Exit 0 only if every shard is there and every cell passed; 1 if "
        "a cell did not pass; 2 if a shard is missing or the inputs are not one matrix's shards.",
    )
    report.add_argument("action", choices=("merge",))
    report.add_argument("inputs", nargs="+", type=Path, metavar="DIR_OR_FILE")
    report.add_argument(
        "--report",
        type=Path,
        default=Path("reports/merged/matrix.json"),
        metavar="PATH",
        help="where the merged JSON goes; JUnit, HTML and Markdown beside it (default: "
        "reports/merged/matrix.json)",
    )
    report.add_argument(
        "--junit", type=Path, metavar="PATH", help="the merged JUnit XML (default: beside)"
    )
    compose = commands.add_parser(
        "compose",
        help="bring docker-compose.test.yml's services up (healthy) or down",
        description="up: start the project of docker-compose.test.yml and wait until Postgres, "
        "Redis and RabbitMQ are healthy, then print where they listen; the harness then runs "
        "on them with --services=compose. down: remove the project with its volumes. ps: show "
        "the services. The project name is HARNESS_COMPOSE_PROJECT (default "
        f"{COMPOSE_PROJECT}); image variables as for the docker backend.",
    )
    compose.add_argument("action", choices=("up", "down", "ps"))
    compose.add_argument(
        "--file",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"the compose file (default: {COMPOSE_FILE}, or HARNESS_COMPOSE_FILE)",
    )
    return parser


def _print_result(result: MatrixResult) -> None:
    """The table, then whatever did not pass in full."""
    print()
    print(render_table(result))
    details = render_details(result)
    if details:
        print()
        print(details)


def _cmd_report(ns: argparse.Namespace) -> int:
    """``harness report merge``: one report from the shards' reports."""
    paths = find_reports(ns.inputs)
    out = ns.report.resolve()
    if any(path.resolve() == out for path in paths):
        raise MergeError(
            f"--report {ns.report} is one of the inputs; write the merge elsewhere, e.g. "
            "--report reports/merged/matrix.json"
        )
    merged = merge(paths)
    result = merged.result
    for index, path in sorted(merged.sources.items()):
        print(f"shard {index}/{result.shards[0]['total'] if result.shards else 1}: {path}")
    _print_result(result)
    print()
    print(merged.balance_line())
    print(publish(result, ns.report, junit=ns.junit, title="ingest-harness matrix (merged)").line())
    print(_verdict(result), flush=True)
    return result.exit_code


def _cmd_compose(ns: argparse.Namespace) -> int:
    env = dict(os.environ)
    file = ns.file or compose_file(env)
    if ns.action == "down":
        compose_down(env, file=file)
        print(f"compose: project {project_name(env)!r} removed")
        return EXIT_OK
    if ns.action == "up":
        print(f"compose: starting project {project_name(env)!r} from {file}...", flush=True)
        found = compose_up(env, file=file)
    else:
        require_engine(env)
        found = endpoints(env)
    for one in found.values():
        where = f"{one.host}:{one.port}" if one.port else "no published port"
        print(f"  {one.service:<9} {one.health:<10} {where:<22} {one.image}")
    if ns.action == "ps" and not found:
        print(f"compose: project {project_name(env)!r} is not up")
        return EXIT_NOT_PASSED
    if ns.action == "up":
        print("run on it with: harness matrix --services=compose (or pytest --services=compose)")
    return EXIT_OK


@dataclass(frozen=True)
class Options:
    """The command line, validated and resolved once."""

    command: str
    config: HarnessConfig
    numprocesses: str
    keyword: str | None
    scenarios: Path
    report: Path
    start_services: bool
    runs: int
    pytest_args: tuple[str, ...]
    hog: bool = False
    pythons: tuple[str, ...] = ()
    junit: Path | None = None
    # When the command began: a report's wall time is exit to exit, services included.
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def pytest_log(self) -> Path:
        return self.report.with_name(self.report.stem + "-pytest.log")


def _useful_workers(config: HarnessConfig) -> int:
    """How many xdist workers the selection can keep busy: under ``--dist loadgroup`` each
    (pool, broker)'s scenarios go to one worker, and the in_process ones to any."""
    cells = config.cells()
    groups = {(cell.pool, cell.broker) for cell in cells if not cell.in_process}
    return max(1, len(groups) + any(cell.in_process for cell in cells))


def _cap_workers(requested: str, config: HarnessConfig) -> tuple[str, str]:
    """(-n to use, what to tell the user) with -n capped at what the selection can use."""
    if requested == "fit":
        if len(config.cells()) <= FIT_IN_PROCESS_CELLS:
            return "0", ""
        requested = "auto"
    if requested == "0":
        return requested, ""
    wanted = (os.cpu_count() or 1) if requested in ("auto", "logical") else int(requested)
    useful = _useful_workers(config)
    if wanted <= useful:
        return str(wanted) if requested in ("auto", "logical") else requested, ""
    return str(useful), (
        f"harness: -n {requested} capped to {useful}: the selection has {useful} group(s) of "
        "scenarios (one per pool and broker, and in_process), and each runs on one xdist worker"
    )


def parse_options(argv: Sequence[str]) -> Options:
    """Parse and validate; argparse exits on syntax errors, `UsageProblem` on bad values."""
    argv = list(argv)
    # Everything after the first `--` belongs to pytest; argparse would try to read it.
    own, extra = argv, []
    if "--" in argv:
        cut = argv.index("--")
        own, extra = argv[:cut], argv[cut + 1 :]
    ns = build_parser().parse_args(own)
    given = {
        "loop_mode": ns.loop_mode,
        "pool": ns.pool,
        "broker": ns.broker,
        "shard": ns.shard,
        "services": ns.services,
        "runner": ns.runner,
        "postgres_image": ns.postgres_image,
        "redis_image": ns.redis_image,
        "fork_server": ns.fork_server,
    }
    try:
        # The same precedence as the pytest plugin (option > ini > HARNESS_* env); the plugin
        # then gets every value explicitly, so the table and pytest agree on the cells.
        config = HarnessConfig.resolve(get_option=given.get, get_ini=lambda name: None)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    if not _NUMPROCESSES.fullmatch(ns.numprocesses):
        raise UsageProblem(
            f"-n/--numprocesses: {ns.numprocesses!r} is not a worker count; use a number "
            "(0 runs without xdist), 'auto' or 'logical'"
        )
    numprocesses, capped = _cap_workers(ns.numprocesses, config)
    if capped:
        print(capped, file=sys.stderr)
    runs = getattr(ns, "runs", 1)
    if runs < 1:
        raise UsageProblem(f"--runs: {runs} is not a number of runs; use 1 or more")
    scenarios = Path(ns.scenarios)
    if not scenarios.exists():
        raise UsageProblem(
            f"--scenarios: {str(scenarios)!r} does not exist (looked in {Path.cwd()}); run "
            "from the project root or pass --scenarios PATH"
        )
    python_source, python_value = (
        ("--python", ns.python)
        if getattr(ns, "python", None)
        else (PYTHON_ENV, os.environ.get(PYTHON_ENV, ""))
    )
    try:
        versions = parse_versions(python_value, option=python_source) if python_value else ()
    except UsageError as exc:
        raise UsageProblem(str(exc)) from None
    pytest_args = tuple(extra)
    if ns.command == "stress":
        pytest_args = (*_STRESS_PYTEST_ARGS, *pytest_args)
    return Options(
        hog=getattr(ns, "hog", False),
        command=ns.command,
        config=config,
        numprocesses=numprocesses,
        keyword=ns.keyword,
        scenarios=scenarios,
        report=ns.report,
        start_services=not ns.no_services,
        runs=runs,
        pytest_args=pytest_args,
        pythons=versions,
        junit=getattr(ns, "junit", None),
    )


# -- services and environment ---------------------------------------------------------------


@contextlib.contextmanager
def _services(opts: Options) -> Iterator[Services | None]:
    """The services for this command, started once; None with --no-services."""
    if not opts.start_services:
        print(
            f"services: not started here (--no-services); pytest gets --services="
            f"{opts.config.services}"
        )
        yield None
        return
    print(f"starting services ({opts.config.services})...", flush=True)
    config = opts.config
    images = DockerImages(postgres=config.postgres_image, redis=config.redis_image)
    with ServiceStack(config.services, images=images) as services:
        print(services.describe(), flush=True)
        yield services


def _service_env(services: Services | None) -> dict[str, str | None]:
    """HARNESS_*_URL for the pytest session: each xdist worker's external backend then makes
    its own database on this server (hence the admin URL, not our own database's)."""
    if services is None:
        return {}
    return {
        "HARNESS_DATABASE_URL": services.postgres_admin_url,
        "HARNESS_REDIS_URL": services.redis_url,
        "HARNESS_AMQP_URL": services.amqp_url,
    }


@contextlib.contextmanager
def _patched_environ(updates: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) variables for the duration; xdist workers inherit them."""
    saved = {name: os.environ.get(name) for name in updates}
    try:
        for name, value in updates.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


# -- harness matrix -------------------------------------------------------------------------


def pytest_arguments(opts: Options, *, services_started: bool) -> list[str]:
    config = opts.config
    args = [
        str(opts.scenarios),
        "-p",
        "no:cacheprovider",
        "-m",
        "matrix",
        # This process imported `harness` before pytest could mark it for assertion rewriting;
        # the warning pytest then issues is an error under the project's filterwarnings=error,
        # and the harness's modules do not rely on rewritten asserts.
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
        # Started here: every session (and xdist worker) uses them by URL.
        f"--services={'external' if services_started else config.services}",
        f"--loop-mode={','.join(config.loop_modes)}",
        f"--pool={','.join(config.pools)}",
        f"--broker={','.join(config.brokers)}",
        f"--runner={config.runner}",
        f"--fork-server={'on' if config.fork_server else 'off'}",
    ]
    if config.shard is not None:
        args.append(f"--shard={config.shard}")
    if opts.numprocesses != "0":
        # Each (pool, broker)'s scenarios to one xdist worker (harness.pytest.plugin's xdist_group
        # marks): each Celery worker is booted once in all, not once per xdist worker.
        args += ["-n", opts.numprocesses, "--dist", "loadgroup"]
    if opts.keyword:
        args += ["-k", opts.keyword]
    args += opts.pytest_args
    return args


def run_pytest(args: Sequence[str], collector: MatrixCollector, log_path: Path) -> int:
    """pytest in this process, its terminal output into `log_path`.

    The collector prints the progress lines to the real stdout; pytest's own reporter (dots,
    tracebacks, summary) would interleave with them, so it writes to the log, which keeps
    every full traceback. Usage errors still reach the console: pytest prints them to stderr.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        return int(pytest.main(list(args), plugins=[collector]))


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _pytest_errors(opts: Options, exit_code: int, collector: MatrixCollector) -> list[str]:
    """What went wrong outside any test, said so that it cannot be mistaken for a pass."""
    errors = list(collector.collection_errors)
    args_hint = "check the arguments after `--`" if opts.pytest_args else "check -k and -n"
    if exit_code == pytest.ExitCode.NO_TESTS_COLLECTED:
        narrowed = f" with -k {opts.keyword!r}" if opts.keyword else ""
        errors.append(
            f"no matrix scenario was collected from {opts.scenarios}{narrowed}: the scenarios "
            "must take the `matrix_cell` fixture (marked `matrix`); check --scenarios and -k"
        )
    elif exit_code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) and not errors:
        try:
            name = pytest.ExitCode(exit_code).name
        except ValueError:  # a plugin's own code
            name = "?"
        if exit_code == pytest.ExitCode.USAGE_ERROR:
            # pytest printed the reason to stderr, which is not redirected: point at it.
            errors.append(f"pytest rejected its arguments (see its error above): {args_hint}")
            return errors
        tail = _tail(opts.pytest_log)
        errors.append(
            f"pytest stopped with exit code {exit_code} ({name}); full output in "
            f"{opts.pytest_log}" + (f"\n{tail}" if tail else "")
        )
    return errors


def _verdict(result: MatrixResult) -> str:
    cells = result.cells()
    counts = {
        status: sum(c.status == status for c in cells)
        for status in ("pass", "fail", "skipped", "interrupted", "not_run")
    }
    detail = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    word = verdict_word(result.exit_code)
    return f"matrix: {word} ({_cells_text(len(cells))}: {detail or 'none'})"


def _cells_text(count: int) -> str:
    return f"{count} cell" if count == 1 else f"{count} cells"


def run_matrix(opts: Options, services: Services | None) -> MatrixResult:
    """One matrix run in this process: progress lines, then the table, details and JSON."""
    config = opts.config
    shard = (
        ""
        if config.shard is None
        else f" of shard {config.shard} (of {_cells_text(len(config.all_cells()))})"
    )
    print(
        f"harness matrix: {_cells_text(len(config.cells()))}{shard} "
        f"({', '.join(config.loop_modes)} x "
        f"{', '.join(config.pools)} x {', '.join(config.brokers)}); scenarios: "
        f"{opts.scenarios}; -n {opts.numprocesses}"
        + ("" if config.runner == "fixed" else f"; runner: {config.runner}"),
        flush=True,
    )
    collector = MatrixCollector(stream=sys.stdout)
    args = pytest_arguments(opts, services_started=services is not None)
    # The reports are written here; the plugin's --harness-report would write them twice.
    with _patched_environ({**_service_env(services), REPORT_ENV: None}):
        exit_code = run_pytest(args, collector, opts.pytest_log)
    collector.flush_pending()
    result = MatrixResult.from_config(
        config,
        collector.records,
        errors=_pytest_errors(opts, exit_code, collector),
        pytest_exit_code=exit_code,
        served_by=served_by(services),
        versions=versions(services),
        wall_s=time.monotonic() - opts.started,
    )
    _print_result(result)
    python = os.environ.get(PYTHON_ENV)
    paths = publish(
        result,
        opts.report,
        junit=opts.junit,
        title="ingest-harness matrix" + (f" (Python {python})" if python else ""),
    )
    print()
    print(f"{paths.line()}; pytest output: {opts.pytest_log}")
    print(_verdict(result), flush=True)
    return result


def _cmd_matrix(opts: Options) -> int:
    if opts.config.fork_server and opts.numprocesses == "0" and not opts.pythons:
        # pytest runs in this process: its workers' fork server imports while the services
        # start and pytest collects (the session's farm takes it).
        with contextlib.suppress(UsageError, OSError):  # the session reports it, if it recurs
            prestart_fork_server()
    with _services(opts) as services:
        if not opts.pythons:
            return run_matrix(opts, services).exit_code
        return _matrix_per_python(opts, services)


def _matrix_per_python(opts: Options, services: Services | None) -> int:
    """The matrix once per ``--python`` version: its workers on that interpreter (the
    in_process cell stays on this one), its report beside ``--report`` with the version. A
    version not found here is skipped with its reason and fails nothing."""
    verdicts = []
    code = EXIT_OK
    for version in opts.pythons:
        if find_interpreter(version) is None:
            # Not this service's failure: said with its reason, and the other versions run.
            verdicts.append(f"Python {version}: skipped: no CPython {version} found here")
            print(f"\n=== Python {version}: skipped: not found (looked in {SEARCHED})")
            continue
        print(f"\n=== Python {version} (pytest and in_process: {platform.python_version()})")
        report = opts.report.with_name(f"{opts.report.stem}-py{version}{opts.report.suffix}")
        junit = opts.junit and opts.junit.with_name(f"{opts.junit.stem}-py{version}.xml")
        one = dataclasses.replace(opts, report=report, junit=junit, pythons=())
        with _patched_environ({PYTHON_ENV: version}):
            result = run_matrix(one, services)
        verdicts.append(f"Python {version}: {_verdict(result)}")
        code = max(code, result.exit_code)
    print("\n" + "\n".join(verdicts), flush=True)
    return code


# -- harness flake --------------------------------------------------------------------------


def _child_argv(opts: Options, report: Path, *, services_started: bool) -> list[str]:
    """`harness matrix` with the same options, for one run in a fresh process.

    A fresh process per run keeps runs independent (imported modules, Celery app state and
    leaked threads of one run cannot make the next one pass or fail), like `make matrix`
    typed 20 times, while the services started once here are reused through the env.
    """
    config = opts.config
    argv = [
        sys.executable,
        "-m",
        "harness",
        "matrix",
        "--no-services",
        f"--services={'external' if services_started else config.services}",
        f"--loop-mode={','.join(config.loop_modes)}",
        f"--pool={','.join(config.pools)}",
        f"--broker={','.join(config.brokers)}",
        f"--runner={config.runner}",
        f"--fork-server={'on' if config.fork_server else 'off'}",
        *([f"--shard={config.shard}"] if config.shard is not None else []),
        f"--numprocesses={opts.numprocesses}",
        f"--scenarios={opts.scenarios}",
        f"--report={report}",
    ]
    if opts.keyword:
        argv += ["-k", opts.keyword]
    if opts.pytest_args:
        argv += ["--", *opts.pytest_args]
    return argv


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _non_passes(
    run: int, document: dict[str, Any] | None, exit_code: int, log: Path
) -> list[dict[str, Any]]:
    """Every test, cell or error of one run that was not a pass, as flake.json lists them."""

    def entry(
        outcome: str, message: str | None, test: str | None = None, cell: Any = None
    ) -> dict[str, Any]:
        mode, pool, broker = cell if cell else (None, None, None)
        return {
            "run": run,
            "loop_mode": mode,
            "pool": pool,
            "broker": broker,
            "test": test,
            "outcome": outcome,
            "message": message,
        }

    if document is None:
        tail = _tail(log, 10)
        return [
            entry(
                "error",
                f"the run wrote no report (exit code {exit_code}); output in {log}"
                + (f"\n{tail}" if tail else ""),
            )
        ]
    found = [entry("error", str(error)) for error in document.get("errors", [])]
    for test in document.get("tests", []):
        if test.get("outcome") != "passed":
            cell = (test.get("loop_mode"), test.get("pool"), test.get("broker"))
            found.append(entry(test["outcome"], test.get("message"), test.get("test"), cell))
    for cell in document.get("cells", []):
        if cell.get("status") == "not_run":
            where = (cell.get("loop_mode"), cell.get("pool"), cell.get("broker"))
            found.append(entry("not_run", "no scenario ran in this cell", cell=where))
    if exit_code != EXIT_OK and not found:
        found.append(entry("error", f"harness matrix exited {exit_code}; output in {log}"))
    return found


def _run_summary(
    run: int, document: dict[str, Any] | None, exit_code: int, seconds: float
) -> dict[str, Any]:
    tests = document.get("tests", []) if document else []
    cells = document.get("cells", []) if document else []
    return {
        "run": run,
        "exit_code": exit_code,
        "passed": sum(t.get("outcome") == "passed" for t in tests),
        "failed": sum(t.get("outcome") == "failed" for t in tests),
        "skipped": sum(t.get("outcome") == "skipped" for t in tests),
        "cells": len(cells),
        "cells_passed": sum(c.get("status") == "pass" for c in cells),
        "duration_s": round(seconds, 2),
    }


def _summary_line(summary: dict[str, Any], runs: int) -> str:
    word = {EXIT_OK: "pass", EXIT_NOT_PASSED: "FAIL"}.get(summary["exit_code"], "ERROR")
    width = len(str(runs))
    return (
        f"run {summary['run']:>{width}}/{runs}  {word:<5}  {summary['passed']} passed, "
        f"{summary['failed']} failed, {summary['skipped']} skipped  "
        f"({summary['cells_passed']}/{summary['cells']} cells pass)  {summary['duration_s']:.1f}s"
    )


def _non_pass_text(item: Mapping[str, Any]) -> str:
    """``run 3  running_loop/prefork/redis  <test id>  FAILED`` and the message's first lines."""
    lines = [
        f"  run {item['run']}  {label_of(item)}  {item['test'] or '-'}  {item['outcome'].upper()}"
    ]
    message = [line for line in (item["message"] or "").splitlines() if line.strip()]
    lines.extend(f"      {line}" for line in message[:_FLAKE_MESSAGE_LINES])
    if len(message) > _FLAKE_MESSAGE_LINES:
        lines.append("      ... (the whole message is in the JSON report)")
    tail = [line for line in (item.get("log_tail") or "").splitlines() if line.strip()]
    if tail:
        lines.append("      the end of that run's pytest output (worker logs of failed tests):")
        lines.extend(f"      | {line}" for line in tail[-15:])
    return "\n".join(lines)


@contextlib.contextmanager
def _cpu_hog(on: bool) -> Iterator[int]:
    """One busy process per core while the block runs (none when off); yields their count.

    Each gets the parent-death signal, so not even a SIGKILL of this process leaves one.
    """
    if not on:
        yield 0
        return
    from harness.services._proc import spawn

    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(os.cpu_count() or 1):
            procs.append(
                spawn(
                    [sys.executable, "-c", "while True: pass"],
                    log_path=Path(os.devnull),
                    deathsig=signal.SIGKILL,
                )
            )
        yield len(procs)
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def _cmd_flake(opts: Options) -> int:
    with _cpu_hog(opts.hog) as hogs:
        if hogs:
            print(f"harness stress: a CPU hog of {hogs} busy processes runs meanwhile", flush=True)
        return _flake_runs(opts)


def _flake_runs(opts: Options) -> int:
    runs_dir = opts.report.with_name(opts.report.stem + "-runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    summaries: list[dict[str, Any]] = []
    non_passes: list[dict[str, Any]] = []
    interrupted = False
    with _services(opts) as services:
        env = dict(os.environ)
        # Each run writes its own reports; only this command's summary goes to the CI page.
        env.pop(STEP_SUMMARY_ENV, None)
        for name, value in _service_env(services).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        print(
            f"harness {opts.command}: {opts.runs} runs of {_cells_text(len(opts.config.cells()))}; "
            f"each run's output in {runs_dir}/",
            flush=True,
        )
        for run in range(1, opts.runs + 1):
            report = runs_dir / f"run-{run:02d}.json"
            log = runs_dir / f"run-{run:02d}.log"
            report.unlink(missing_ok=True)  # a stale report must not stand in for a dead run
            argv = _child_argv(opts, report, services_started=services is not None)
            started = time.monotonic()
            try:
                with log.open("w", encoding="utf-8") as out:
                    code = subprocess.run(
                        argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False
                    ).returncode
            except KeyboardInterrupt:
                interrupted = True
                print(f"interrupted during run {run}; reporting the runs before it")
                break
            document = _read_report(report)
            summary = _run_summary(run, document, code, time.monotonic() - started)
            summary.update(report=str(report), log=str(log))
            summaries.append(summary)
            found = _non_passes(run, document, code, log)
            if found and opts.command == "stress":
                # The worker logs of a failed test are in that run's pytest output.
                tail = _tail(report.with_name(report.stem + "-pytest.log"), _LOG_TAIL_STRESS)
                for item in found:
                    item["log_tail"] = tail
            non_passes.extend(found)
            print(_summary_line(summary, opts.runs), flush=True)
        service_versions = versions(services)
        service_backend = served_by(services)

    if non_passes:
        print(f"\n{len(non_passes)} non-pass(es):")
        for item in non_passes:
            print(_non_pass_text(item))
    exit_code = EXIT_INTERRUPTED if interrupted else (EXIT_NOT_PASSED if non_passes else EXIT_OK)
    config = opts.config
    write_json(
        opts.report,
        {
            "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "runs": opts.runs,
            "completed_runs": len(summaries),
            "selected": {
                "loop_modes": list(config.loop_modes),
                "pools": list(config.pools),
                "brokers": list(config.brokers),
                "services": config.services,
            },
            "versions": service_versions,
            "served_by": service_backend,
            "run_results": summaries,
            "non_passes": non_passes,
            "exit_code": exit_code,
        },
    )
    # One JUnit test suite per run that wrote a report; the Markdown lists runs and non-passes.
    suites = []
    for summary in summaries:
        document = _read_report(Path(summary["report"]))
        if document is not None:
            with contextlib.suppress(ValueError):
                suites.append((f"run {summary['run']}", MatrixResult.from_json(document)))
    junit = opts.junit or junit_beside(opts.report)
    write_junit(junit, suites)
    markdown = opts.report.with_suffix(".md")
    step_summary = publish_text(
        render_flake_markdown(opts.command, opts.runs, summaries, non_passes, exit_code),
        markdown,
    )
    verdict = verdict_word(exit_code)  # 0, 1 or 130 (interrupted): PASS or FAIL
    page = opts.report.with_suffix(".html")
    write_atomic(
        page,
        render_flake_html(
            opts.command, opts.runs, summaries, non_passes, verdict, base=page.parent
        ),
    )
    print(
        f"\nreports: {opts.report}, {junit}, {page}, {markdown}"
        + (f" (and {step_summary})" if step_summary else "")
        + f"\n{opts.command}: {verdict} ({len(non_passes)} non-passes in {len(summaries)} runs)",
        flush=True,
    )
    return exit_code


# -- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`harness matrix|flake [options] [-- pytest args]`; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = "harness " + (
        args[0] if args and args[0] in ("matrix", "flake", "stress", "compose", "report") else ""
    )
    # The commands that are not a matrix run: their own handler, and the error they report.
    plain: dict[str, tuple[Callable[[argparse.Namespace], int], type[Exception], str]] = {
        "report": (_cmd_report, MergeError, "harness report: error: "),
        "compose": (_cmd_compose, ServicesError, "harness compose: "),
    }
    if args and args[0] in plain:
        handler, error, say = plain[args[0]]
        try:
            return handler(build_parser().parse_args(args))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else EXIT_ERROR
        except error as exc:
            print(f"{say}{exc}", file=sys.stderr)
            return EXIT_ERROR
    try:
        opts = parse_options(args)
    except SystemExit as exc:  # argparse: --help (0) or a syntax error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except UsageProblem as exc:
        print(f"{prog.strip()}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if opts.command in ("flake", "stress"):
            return _cmd_flake(opts)
        return _cmd_matrix(opts)
    except ServicesError as exc:
        print(f"{prog.strip()}: services could not start:\n{exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        # Reached only outside pytest (which reports its own interruption): services were
        # starting or stopping, and the context managers have cleaned up by now.
        print(f"{prog.strip()}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
