"""Mark stale ``queued``/``running`` ingest runs ``failed`` so their slot is free again.

A thin command line over ``app.maintenance.unlock_stale_runs`` (see it for what "stale" means
and what is written). Safe while workers run: a run with a fresh heartbeat is never touched.

    python scripts/unlock_stale_runs.py --dry-run
    python -m scripts.unlock_stale_runs --older-than 2h --project-id 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

# Run as a file (`python scripts/unlock_stale_runs.py`), Python puts scripts/ on the path, not
# the checkout the service is imported from.
_CHECKOUT = str(Path(__file__).resolve().parent.parent)
if _CHECKOUT not in sys.path:
    sys.path.insert(0, _CHECKOUT)

from pydantic import ValidationError
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from app.config import describe_settings_error, get_settings
from app.maintenance import (
    DEFAULT_OLDER_THAN,
    DURATION_FORMS,
    UnlockedRun,
    format_duration,
    parse_duration,
    unlock_stale_runs,
)
from app.utils.cli import OneLineParser

__all__ = ["main"]


def _older_than(value: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as exc:
        # ArgumentTypeError: argparse prints this message as is, then exits with status 2.
        raise argparse.ArgumentTypeError(str(exc)) from None


_URL_FORM = "postgresql+psycopg2://user:password@host:port/db"


def _database_url(value: str) -> URL:
    try:
        url = make_url(value)
    except ArgumentError:
        # Never echo the value: it may hold a password.
        raise argparse.ArgumentTypeError(f"not a database URL; expected {_URL_FORM}") from None
    if url.get_backend_name() != "postgresql":
        # Anything else would fail in a driver import, or quietly create a SQLite file.
        raise argparse.ArgumentTypeError(
            f"a {url.get_backend_name()} URL; the runs live in PostgreSQL: {_URL_FORM}"
        )
    return url


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="unlock_stale_runs",
        description=(
            "Mark running runs whose last heartbeat (started_at when there is none) is older "
            "than --older-than, and queued runs created before that, as failed."
        ),
    )
    parser.add_argument(
        "--older-than",
        type=_older_than,
        default=DEFAULT_OLDER_THAN,
        metavar="DURATION",
        help=f"how long without a sign of life makes a run stale: {DURATION_FORMS}; "
        f"default {format_duration(DEFAULT_OLDER_THAN)}",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the stale runs and change nothing"
    )
    parser.add_argument("--project-id", type=int, metavar="ID", help="only runs of this project")
    parser.add_argument(
        "--database-url",
        type=_database_url,
        metavar="URL",
        help="the database (default: APP_DATABASE_URL)",
    )
    return parser


def _line(run: UnlockedRun, *, dry_run: bool) -> str:
    verb = "would unlock" if dry_run else "unlocked"
    return (
        f"{verb} run {run.id}: project {run.project_id}, marketplace {run.marketplace_code}, "
        f"job {run.job_code}, was {run.previous_status}, {run.describe_last_seen()}"
    )


def _summary(runs: Sequence[UnlockedRun], *, dry_run: bool, scope: str, where: str) -> str:
    count = f"{len(runs)} stale run{'' if len(runs) == 1 else 's'}"
    if dry_run:
        return f"dry run: {count} would be unlocked ({scope}) in {where}; nothing was changed"
    return f"unlocked {count} ({scope}) in {where}"


def _joined_negative_values(argv: Sequence[str]) -> list[str]:
    """``--older-than -5m`` as ``--older-than=-5m``: argparse takes ``-5m`` for an option and
    would say only "expected one argument"; joined, the value's own check explains it."""
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        following = items[i + 1] if i + 1 < len(items) else ""
        if items[i] == "--older-than" and following[:1] == "-" and following[1:2].isdigit():
            out.append(f"--older-than={following}")
            i += 2
            continue
        out.append(items[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(_joined_negative_values(sys.argv[1:] if argv is None else argv))
    url: URL | None = args.database_url
    if url is None:
        try:
            url = _database_url(get_settings().database_url)
        except ValidationError as exc:
            # Only the messages: pydantic's full text repeats the input, password included.
            parser.error(describe_settings_error(exc))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"APP_DATABASE_URL: {exc}")
    where = url.render_as_string(hide_password=True)
    older_than: timedelta = args.older_than
    project_id: int | None = args.project_id
    dry_run: bool = args.dry_run

    try:
        runs = unlock_stale_runs(url, older_than=older_than, project_id=project_id, dry_run=dry_run)
    except SQLAlchemyError as exc:
        # The driver's own message (no statement, no parameters) and the masked URL.
        reason = str(getattr(exc, "orig", None) or exc).strip()
        print(f"unlock_stale_runs: failed on {where}: {reason}", file=sys.stderr)
        return 1

    for run in runs:
        print(_line(run, dry_run=dry_run))
    scope = f"older than {format_duration(older_than)}"
    if project_id is not None:
        scope += f", project {project_id}"
    print(_summary(runs, dry_run=dry_run, scope=scope, where=where))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
