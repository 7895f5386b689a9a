"""Every report of a matrix run, written in one place: JSON, JUnit XML, HTML and Markdown.

``harness matrix``, ``harness report merge`` and a ``pytest --harness-report`` run all call
:func:`publish`, so the four always agree. The JSON path is the one given (``--report``); the
others go beside it unless set: ``matrix.json`` -> ``matrix-junit.xml``, ``matrix.html``,
``matrix.md``. The Markdown is also appended to ``$GITHUB_STEP_SUMMARY`` where it is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harness.matrix.html import write_html
from harness.matrix.junit import write_junit
from harness.matrix.markdown import publish_markdown
from harness.matrix.report import MatrixResult, to_json, write_json

__all__ = ["REPORT_ENV", "ReportPaths", "junit_beside", "publish"]

#: The variable of the pytest plugin's ``--harness-report`` (harness.pytest.reports).
REPORT_ENV: Final = "HARNESS_REPORT"


def junit_beside(report: Path) -> Path:
    """``reports/matrix.json`` -> ``reports/matrix-junit.xml``."""
    return report.with_name(f"{report.stem}-junit.xml")


@dataclass(frozen=True)
class ReportPaths:
    json: Path
    junit: Path
    html: Path
    markdown: Path
    step_summary: Path | None

    def line(self) -> str:
        """``reports: a.json, a-junit.xml, a.html, a.md (and $GITHUB_STEP_SUMMARY)``."""
        return f"reports: {self.json}, {self.junit}, {self.html}, {self.markdown}" + (
            f" (and {self.step_summary})" if self.step_summary else ""
        )


def publish(
    result: MatrixResult,
    report: Path,
    *,
    junit: Path | None = None,
    title: str = "ingest-harness matrix",
    env: Mapping[str, str] | None = None,
) -> ReportPaths:
    """Write the four reports of ``result``; ``report`` is the JSON's path."""
    write_json(report, to_json(result))
    junit_path = junit or junit_beside(report)
    # A shard's grid shows its own cells only: the title says whose part it is.
    if result.shard is not None:
        title += f" (shard {result.shard})"
    write_junit(junit_path, [(title, result)])
    html_path = report.with_suffix(".html")
    write_html(html_path, result, title=title)
    markdown = report.with_suffix(".md")
    summary = publish_markdown(result, markdown, title=title, env=env)
    return ReportPaths(report, junit_path, html_path, markdown, summary)
