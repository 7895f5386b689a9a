"""The matrix's reports from a plain ``pytest`` run: ``--harness-report PATH``.

``harness matrix`` writes its reports itself; a project that runs the plugin under its own
``pytest`` (or ``make test``) gets the same four with ``--harness-report reports/matrix.json``
(ini ``harness_report``, ``HARNESS_REPORT``): JSON there, JUnit XML beside it (or at
``--harness-junit``), HTML and Markdown beside it, the Markdown also appended to
``$GITHUB_STEP_SUMMARY``.

The collector is registered only in the process that sees every report: the xdist controller
under ``-n``, the session itself without it; xdist workers never write a report. The
services' versions come from each xdist worker's ``workeroutput`` (:func:`note_services`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Final

import pytest

from harness.core.config import HarnessConfig
from harness.matrix import facts
from harness.matrix.publish import REPORT_ENV, publish
from harness.matrix.report import MatrixCollector, MatrixResult
from harness.services import Services

__all__ = ["REPORT_ENV", "add_options", "note_services", "register"]

_SERVICES_KEY: Final = "harness_services"
_served_key: Final = pytest.StashKey[dict[str, Any]]()


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("ingest-harness")
    report_help = (
        "write the matrix's reports: JSON at PATH, and beside it JUnit XML (<name>-junit.xml), "
        f"HTML and Markdown (or ${REPORT_ENV})"
    )
    group.addoption("--harness-report", dest="harness_report", default=None, help=report_help)
    parser.addini("harness_report", report_help, default=None)
    group.addoption(
        "--harness-junit",
        dest="harness_junit",
        default=None,
        help="where the JUnit XML of --harness-report goes (default: beside the JSON)",
    )


def note_services(config: pytest.Config, services: Services) -> None:
    """Record which backend and versions served this process's session, for the report."""
    served = {"served_by": facts.served_by(services), "versions": facts.versions(services)}
    config.stash[_served_key] = served
    workeroutput = getattr(config, "workeroutput", None)
    if isinstance(workeroutput, dict):
        workeroutput[_SERVICES_KEY] = served  # xdist sends it to the controller at the end


class _Reporter:
    def __init__(self, config: pytest.Config, harness_config: HarnessConfig, path: Path) -> None:
        self.config = config
        self.harness_config = harness_config
        self.path = path
        self.junit = config.getoption("harness_junit")
        self.collector = MatrixCollector()
        self.started = time.monotonic()
        self.served: dict[str, Any] | None = None

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        served = getattr(node, "workeroutput", {}).get(_SERVICES_KEY)
        if isinstance(served, dict) and self.served is None:
            self.served = served

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.collector.flush_pending()
        served = self.served or self.config.stash.get(_served_key, None)
        # The servers' versions from the session that ran them; the rest are this process's.
        versions = {**facts.versions(None), **(served or {}).get("versions", {})}
        result = MatrixResult.from_config(
            self.harness_config,
            self.collector.records,
            errors=self.collector.collection_errors,
            pytest_exit_code=int(exitstatus),
            served_by=None if served is None else served.get("served_by"),
            versions=versions,
            wall_s=time.monotonic() - self.started,
        )
        paths = publish(result, self.path, junit=Path(self.junit) if self.junit else None)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"ingest-harness {paths.line()}")


def register(config: pytest.Config, harness_config: HarnessConfig) -> None:
    """Collect the session's reports for --harness-report, in the process that sees them all."""
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller writes the report
    value = config.getoption("harness_report") or os.environ.get(REPORT_ENV, "").strip()
    value = value or str(config.getini("harness_report") or "").strip()
    if not value:
        return
    reporter = _Reporter(config, harness_config, Path(value))
    config.pluginmanager.register(reporter.collector, "harness-report-collector")
    config.pluginmanager.register(reporter, "harness-report")
