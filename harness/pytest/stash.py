"""What the plugin keeps on pytest's objects, for the fixtures (``harness.pytest.fixtures``) and
a project's own: the resolved config on the config, each phase's report and the failure
evidence on the item. Its own module so that the plugin and the fixtures both import it and
neither imports the other back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import pytest

from harness.core.config import HarnessConfig

__all__ = [
    "FailureDetail",
    "add_failure_detail",
    "collect_failure_details",
    "harness_config_key",
    "phase_failed",
    "phase_reports_key",
]

harness_config_key: Final = pytest.StashKey[HarnessConfig]()
# Each phase's report ("setup", "call", "teardown") as it was made, for fixtures' teardown.
phase_reports_key: Final = pytest.StashKey[dict[str, pytest.TestReport]]()
# A (section title, text) to show under a failed test; called only when a phase failed.
FailureDetail = Callable[[], tuple[str, str]]
_failure_details_key: Final = pytest.StashKey[list[FailureDetail]]()


def add_failure_detail(item: pytest.Item, detail: FailureDetail) -> None:
    """Have ``detail()`` appended as a report section if a phase of ``item`` fails.

    Called only on failure, so a passing test never pays for reading logs or rows; an error
    inside it becomes the section's text and never hides the test's own failure.
    """
    item.stash.setdefault(_failure_details_key, []).append(detail)


def phase_failed(item: pytest.Item) -> bool:
    """Whether a phase of ``item`` reported so far failed (for a fixture's teardown)."""
    return any(report.failed for report in item.stash.get(phase_reports_key, {}).values())


def collect_failure_details(item: pytest.Item, report: pytest.TestReport) -> None:
    """Keep ``report``; on the item's first failed phase, append its evidence as sections."""
    reports = item.stash.setdefault(phase_reports_key, {})
    # Evidence goes with the first failed phase only (a failed call is often followed by a
    # failed teardown; the same sections twice would only bury the failure).
    first_failure = report.failed and not any(r.failed for r in reports.values())
    reports[report.when] = report
    if not first_failure:
        return
    for detail in item.stash.get(_failure_details_key, []):
        try:
            title, text = detail()
        except Exception as exc:  # evidence is a bonus: never replace the real failure
            title, text = "harness", f"could not collect failure details: {exc!r}"
        report.sections.append((title, text))
