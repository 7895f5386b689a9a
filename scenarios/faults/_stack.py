"""What the stack-level fault scenarios share: a whole stack of their own, and its checks.

The concurrent-start and load scenarios run a ``FullStack`` (API on uvicorn, a real worker, the
marketplace) on the session's Postgres and Redis, with a database of its own: every run in it is
theirs, so ``harness.checks.faults.assert_fault_invariants`` can be asserted over whole tables. Not
a test module.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
from sqlalchemy import text

from harness.checks.faults import RowsKey, assert_fault_invariants
from harness.core.logs import COMPLETED_TEMPLATE, FAILED_TEMPLATE
from harness.core.runs import RunRow, RunStore
from harness.services import Services
from harness.workers.process import CeleryWorkerProcess, mask_secrets

if TYPE_CHECKING:
    from harness.workers.stack import FullStack

__all__ = [
    "api_client",
    "assert_domain_stored",
    "assert_stack_invariant",
    "expected_rows",
    "own_stack",
    "read_runs",
    "wait_all_terminal",
]

# The columns a run copies from the marketplace's items, in the order they are compared.
_VALUE_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "frontend_prices": ("sku", "price", "currency", "discount_price", "observed_at"),
    "stocks": ("sku", "warehouse", "quantity", "observed_at"),
}
_SHOWN_DIFFERENCES: Final = 20
# One query per poll for all runs: polling each run would put dozens of queries a second on
# the two cores the worker and Postgres need.
_POLL_S: Final = 0.05


@contextmanager
def own_stack(
    services: Services,
    log_dir: Path,
    *,
    name: str,
    pool: str = "solo",
    concurrency: int | None = None,
    loop_mode: str = "no_loop",
    worker_settings: Mapping[str, str] | None = None,
) -> Iterator[FullStack]:
    """A ``FullStack`` on ``services`` with a fresh database ``faults_<name>_<hex>``.

    ``worker_settings``: further ``APP_*`` variables of the stack's worker.

    ``loop_mode`` is the worker's default mode: runs the API enqueues carry no loop-mode header,
    so every run of the stack executes under it.
    """
    # Lazy: FastAPI, Alembic and the rest of the stack would add to every pytest process's start.
    from harness.workers.stack import FullStack

    database = f"faults_{name}_{secrets.token_hex(4)}"
    with FullStack(
        services=services,
        database=database,
        pool=pool,
        concurrency=concurrency,
        loop_mode=loop_mode,
        log_dir=log_dir,
        worker_settings=worker_settings,
    ) as stack:
        yield stack


def api_client(stack: FullStack, *, timeout: float = 10.0) -> httpx.Client:
    """A client of the stack's API with the stack's token (allowed every project)."""
    return httpx.Client(
        base_url=stack.url,
        headers={"Authorization": f"Bearer {stack.token}"},
        timeout=timeout,
    )


def read_runs(store: RunStore, run_ids: Sequence[int]) -> dict[int, RunRow]:
    """The rows of ``run_ids`` as stored now, by id, in one query."""
    return store.read_many(run_ids)


def wait_all_terminal(
    store: RunStore,
    run_ids: Sequence[int],
    *,
    timeout: float,
    worker: CeleryWorkerProcess | None = None,
) -> dict[int, RunRow]:
    """Poll until every run is ``success`` or ``failed``; their rows, by id.

    With ``worker``, also until its log holds each run's last line ("completed" or "failed"):
    a run's row is committed before that line is written, so under load the log can be a
    moment behind the rows. Fails at the deadline, or at once when ``worker`` has exited,
    listing the runs still active and the worker log's tail.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows = read_runs(store, run_ids)
        pending = [i for i in run_ids if i not in rows or not rows[i].terminal]
        if not pending and worker is not None:
            ends = {
                i: COMPLETED_TEMPLATE.format(run_id=i)
                if rows[i].status == "success"
                else FAILED_TEMPLATE.format(run_id=i, error=rows[i].error_message)
                for i in run_ids
            }
            logged = {x.headline for x in worker.log_lines()}
            pending = [i for i in run_ids if ends[i] not in logged]
        if not pending:
            return rows
        dead = worker is not None and not worker.is_alive()
        if dead or time.monotonic() >= deadline:
            states = ", ".join(
                f"{i}: {rows[i].status if i in rows else 'no row'}" for i in pending[:10]
            )
            reason = (
                f"the worker exited with code {worker.returncode}"
                if dead and worker is not None
                else f"{timeout:g} s passed"
            )
            tail = ""
            if worker is not None:
                lines = worker.read_log().splitlines()[-30:]
                tail = "\nworker log tail:\n" + "\n".join(
                    f"    {mask_secrets(line)}" for line in lines
                )
            raise AssertionError(
                f"{len(pending)} of {len(run_ids)} runs are not terminal, or their last line is "
                f"not in the worker log ({reason}); first ones: {states}{tail}"
            )
        time.sleep(_POLL_S)


def _served_row(domain: str, item: Mapping[str, Any]) -> tuple[Any, ...]:
    """A marketplace item as the job stores it: decimals for money, aware datetimes."""
    values: list[Any] = []
    for column in _VALUE_COLUMNS[domain]:
        value = item.get(column)
        if column in ("price", "discount_price"):
            value = None if value is None else Decimal(str(value))
        elif column == "observed_at":
            value = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        values.append(value)
    return tuple(values)


def stored_rows(
    store: RunStore, domain: str, *, project_id: int, marketplace_code: str
) -> list[tuple[Any, ...]]:
    """The rows of ``domain`` for one project and marketplace, ordered by their key."""
    columns = _VALUE_COLUMNS[domain]
    # sku (and warehouse) lead: the rows come in the order of the table's key.
    key = ", ".join(c for c in columns if c in ("sku", "warehouse"))
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                f"SELECT {', '.join(columns)} FROM {domain} "
                f"WHERE project_id = :p AND marketplace_code = :m ORDER BY {key}"
            ),
            {"p": project_id, "m": marketplace_code},
        ).all()
    return [tuple(row) for row in rows]


def assert_domain_stored(
    store: RunStore,
    domain: str,
    *,
    project_id: int,
    marketplace_code: str,
    served: Sequence[Mapping[str, Any]],
) -> None:
    """``domain`` holds exactly the items the marketplace served for this project and code."""
    want = sorted(_served_row(domain, item) for item in served)
    got = stored_rows(store, domain, project_id=project_id, marketplace_code=marketplace_code)
    if got == want:
        return
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    raise AssertionError(
        f"{domain} for project {project_id} / {marketplace_code!r}: {len(got)} rows stored, "
        f"{len(want)} items served; {len(missing)} served items missing or different, "
        f"{len(extra)} stored rows not served"
        + "".join(f"\n  missing: {row!r}" for row in missing[:_SHOWN_DIFFERENCES])
        + "".join(f"\n  extra:   {row!r}" for row in extra[:_SHOWN_DIFFERENCES])
    )


def expected_rows(stack: FullStack, keys: Iterable[tuple[int, str, str]]) -> dict[RowsKey, int]:
    """What the domain tables must hold after successful runs of ``(project, code, job)``."""
    return {
        (job, project, code): len(stack.marketplace.expected(code, job))
        for project, code, job in keys
    }


def assert_stack_invariant(stack: FullStack, keys: Iterable[tuple[int, str, str]]) -> None:
    """The fault invariant over the stack's whole database, every run expected to succeed.

    Every run terminal, no duplicated domain row, each (table, project, marketplace) holding
    exactly what its run was served and nothing anywhere else, and no traceback in the
    worker's log (nothing was provoked).
    """
    assert_fault_invariants(
        stack.store, stack.worker.log_lines(), expected_rows=expected_rows(stack, keys)
    )
