"""Checks the scenarios share beyond ``harness.checks.assertions``: the domain rows and the shim's
lines.

Not a test module: the scenarios import it (``scenarios`` is a package).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from sqlalchemy import text

from harness.checks.assertions import RunAssertionError, assert_loop_log, run_log_excerpt
from harness.core.logs import (
    CLOSED_CHECK_OK_TEMPLATE,
    COMPLETED_TEMPLATE,
    FAILED_TEMPLATE,
    FORBIDDEN_TEXT,
    IDLE_CHECK_OK_TEMPLATE,
    INHERITED_CHECK_OK_TEMPLATE,
    JOB_FAULT_TEMPLATE,
    LOOP_MODE_TEMPLATE,
    PROBE_RE,
    SHARED_LOOP_TEMPLATE,
    STARTING_TEMPLATE,
    LogLine,
    find_forbidden,
    harness_lines,
    probe_lines,
    runner_lines,
    task_lines,
)
from harness.core.runs import RunStore
from harness.workers.loopmodes import DEFAULT_MODE_ENV, HEADER_SOURCE, LoopMode

__all__ = [
    "DEFAULT_MODE_SOURCE",
    "DOMAIN",
    "assert_nothing_left_behind",
    "assert_prices_stored",
    "assert_run_log",
    "assert_shim_lines",
    "stored_prices",
]

DOMAIN: Final = "frontend_prices"
# The modes that set a loop for the thread, and the shim's line that says it is as it was.
_LOOP_CHECK_OK: Final = {
    LoopMode.IDLE_LOOP: IDLE_CHECK_OK_TEMPLATE,
    LoopMode.CLOSED_LOOP: CLOSED_CHECK_OK_TEMPLATE,
    LoopMode.INHERITED_LOOP: INHERITED_CHECK_OK_TEMPLATE,
}
# A run the API enqueued carries no header: the worker's default mode is forced.
DEFAULT_MODE_SOURCE: Final = DEFAULT_MODE_ENV


def _served(item: Mapping[str, Any]) -> tuple[str, Decimal, str, Decimal | None, datetime]:
    discount = item.get("discount_price")
    return (
        str(item["sku"]),
        Decimal(str(item["price"])),
        str(item["currency"]),
        None if discount is None else Decimal(str(discount)),
        datetime.fromisoformat(str(item["observed_at"]).replace("Z", "+00:00")),
    )


def stored_prices(
    store: RunStore, *, project_id: int, marketplace_code: str
) -> list[tuple[Any, ...]]:
    """The ``frontend_prices`` rows of one project and marketplace, by sku."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT sku, price, currency, discount_price, observed_at FROM frontend_prices "
                "WHERE project_id = :p AND marketplace_code = :m ORDER BY sku"
            ),
            {"p": project_id, "m": marketplace_code},
        ).all()
    return [tuple(row) for row in rows]


def assert_prices_stored(
    store: RunStore,
    *,
    project_id: int,
    marketplace_code: str,
    served: Sequence[Mapping[str, Any]],
) -> None:
    """The domain table holds exactly the items the marketplace served, value for value."""
    want = sorted(_served(item) for item in served)
    got = stored_prices(store, project_id=project_id, marketplace_code=marketplace_code)
    if got == want:
        return
    diff = "\n".join(
        difflib.unified_diff(
            [repr(r) for r in want],
            [repr(r) for r in got],
            "served by the marketplace",
            "stored in frontend_prices",
            lineterm="",
            n=1,
        )
    )
    raise AssertionError(
        f"frontend_prices for project {project_id} / {marketplace_code}: {len(got)} rows "
        f"stored, {len(want)} items served; first differences:\n"
        + "\n".join(diff.splitlines()[:40])
    )


def assert_shim_lines(
    lines: Sequence[LogLine],
    run_id: int,
    mode: str,
    *,
    shared_loop_allowed: bool = False,
    job_fault: str | None = None,
    source: str = HEADER_SOURCE,
) -> None:
    """The harness's own lines for the run: the mode it forced, and for ``idle_loop`` that the
    thread's idle loop was still set and open after the run (the runner must not clobber it),
    for ``closed_loop`` that the closed loop was still set and still closed.

    ``shared_loop_allowed``: runs in flight at once under gevent may start while another run's
    loop runs on their OS thread; the shim's line that says so is then accepted, never required.
    Everywhere else it is a failure: one run at a time must see the mode it asked for.
    ``job_fault``: the fault the run's job was asked to raise (its line follows the mode's).
    ``source``: where the mode came from (the message's header, unless the API enqueued the run
    and the worker's ``HARNESS_DEFAULT_LOOP_MODE`` gave it)."""
    want = [LOOP_MODE_TEMPLATE.format(run_id=run_id, mode=mode, source=source)]
    if job_fault is not None:
        want.append(JOB_FAULT_TEMPLATE.format(run_id=run_id, fault=job_fault))
    shared = SHARED_LOOP_TEMPLATE.format(run_id=run_id)
    if shared_loop_allowed and shared in [line.headline for line in harness_lines(lines, run_id)]:
        want.append(shared)
    if mode in _LOOP_CHECK_OK:
        want.append(_LOOP_CHECK_OK[mode].format(run_id=run_id))
    got = [line.headline for line in harness_lines(lines, run_id)]
    assert got == want, (
        f"the loop-mode shim's lines for run {run_id} differ:\n  got:  {got}\n  want: {want}"
    )


def assert_run_log(
    lines: Sequence[LogLine],
    run_id: int,
    mode: str,
    *,
    runner: str,
    outcome: str = "success",
    error: str | None = None,
) -> None:
    """The run's log lines as the runner under test writes them.

    With the fixed runner: the runbook's step 3 (``assert_loop_log``). The pre-fix runner
    (``--runner prefix``) wrote no runner line, so there its absence is what is asserted (it
    also proves the injection took effect), with the task's own lines and no pre-fix error
    in the log. Either way a running-loop cell under the pre-fix runner fails, on the row
    already: that is the harness's proof of power, not a missing log line.
    """
    if runner == "fixed":
        assert_loop_log(lines, run_id, mode, outcome=outcome, error=error)
        return
    problems = []
    if runner_lines(lines, run_id):
        problems.append("a runner line was logged: the pre-fix runner was not injected")
    end = (
        COMPLETED_TEMPLATE.format(run_id=run_id)
        if outcome == "success"
        else FAILED_TEMPLATE.format(run_id=run_id, error=error)
    )
    want = [STARTING_TEMPLATE.format(run_id=run_id), end]
    got = [line.headline for line in task_lines(lines, run_id)]
    if got != want:
        problems.append(f"task lines differ: got {got}, want {want}")
    if find_forbidden(lines):
        problems.append(f"the log contains {FORBIDDEN_TEXT!r}")
    if problems:
        raise RunAssertionError(
            "\n".join(
                [f"worker log for run {run_id} ({mode}, runner {runner}) is not as expected:"]
                + [f"  - {p}" for p in problems]
                + [run_log_excerpt(lines, run_id)]
            )
        )


# The runner's idle helper parks for a moment after a call on the thread path, then exits.
IDLE_HELPER_PREFIX: Final = "run_async_safe-"


def assert_nothing_left_behind(lines: Sequence[LogLine], run_id: int) -> None:
    """The shim's probe after the run (a run made alone in its process): no loop left open, no
    task left pending, no database connection left open, no thread left running but the
    runner's one idle helper."""
    probes = probe_lines(lines, run_id)
    assert len(probes) == 1, f"expected one probe line for run {run_id}, got {len(probes)}"
    match = PROBE_RE.match(probes[0].headline)
    assert match is not None
    threads = [] if match["new_threads"] == "none" else match["new_threads"].split(",")
    problems = []
    if match["open_loops"] != "0":
        problems.append(f"{match['open_loops']} event loop(s) left open")
    if match["pending_tasks"] != "0":
        problems.append(f"{match['pending_tasks']} task(s) left pending")
    if int(match["db_connections"]) > 0:
        problems.append(f"{match['db_connections']} database connection(s) left open")
    helpers = [name for name in threads if name.startswith(IDLE_HELPER_PREFIX)]
    others = [name for name in threads if not name.startswith(IDLE_HELPER_PREFIX)]
    if others or len(helpers) > 1:
        problems.append(f"threads left running: {threads}")
    assert not problems, (
        f"run {run_id} left something loop-bound behind in its worker process: "
        + "; ".join(problems)
        + f"\n  {probes[0].raw}"
    )
