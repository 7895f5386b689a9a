"""``unlock_stale_runs``: the function against a real Postgres, the CLI, the script as a process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine, create_engine, insert, make_url, select, update

from app.config import get_settings
from app.maintenance import format_duration, parse_duration, unlock_stale_runs
from app.models import IngestRun
from scripts.unlock_stale_runs import main

REPO_ROOT = Path(__file__).resolve().parent.parent

NOW = datetime(2026, 1, 27, 10, 20, tzinfo=UTC)
STALE = NOW - timedelta(minutes=20)  # 10:00, past the default 15 minutes
FRESH = NOW - timedelta(minutes=5)  # 10:15
OLD_START = NOW - timedelta(minutes=25)  # 09:55
PREFIX = "unlocked as stale by unlock_stale_runs"


@pytest.fixture
def engine(clean_db: str) -> Iterator[Engine]:
    # lock_timeout: if the unlocker ever waited on a worker's row lock, the test fails quickly
    # instead of hanging.
    eng = create_engine(clean_db, connect_args={"options": "-c lock_timeout=5000"})
    yield eng
    eng.dispose()


_job_seq = iter(range(1_000_000))


def add_run(
    engine: Engine,
    status: str,
    *,
    created_at: datetime,
    started_at: datetime | None = None,
    heartbeat_at: datetime | None = None,
    project_id: int = 1,
    **extra: Any,
) -> int:
    """Insert a run; a fresh job_code each time, as the one-active-run index demands."""
    values: dict[str, Any] = {
        "project_id": project_id,
        "marketplace_code": "ozon",
        "job_code": f"job_{next(_job_seq)}",
        "status": status,
        "created_at": created_at,
        "started_at": started_at,
        "heartbeat_at": heartbeat_at,
        **extra,
    }
    with engine.begin() as conn:
        return int(
            conn.execute(insert(IngestRun).values(values).returning(IngestRun.id)).scalar_one()
        )


def rows(engine: Engine) -> dict[int, dict[str, Any]]:
    with engine.connect() as conn:
        result = conn.execute(select(IngestRun.__table__).order_by(IngestRun.id)).mappings()
        return {row["id"]: dict(row) for row in result}


def row(engine: Engine, run_id: int) -> dict[str, Any]:
    return rows(engine)[run_id]


# --- the function -------------------------------------------------------------------------


def test_running_with_stale_heartbeat_is_failed_with_message_finish_and_duration(
    engine: Engine,
) -> None:
    # A start with a sub-millisecond part: duration_ms is rounded down, never up.
    started = OLD_START + timedelta(microseconds=999)
    run_id = add_run(
        engine, "running", created_at=OLD_START, started_at=started, heartbeat_at=STALE
    )

    with freeze_time(NOW):
        unlocked = unlock_stale_runs(engine)

    after = row(engine, run_id)
    message = f"{PREFIX}: status was running, last heartbeat 2026-01-27T10:00:00Z (older than 15m)"
    assert after["status"] == "failed"
    assert after["finished_at"] == NOW
    assert after["duration_ms"] == 25 * 60 * 1000 - 1
    assert after["error_message"] == message
    # The evidence stays: the last heartbeat and the start are not rewritten.
    assert after["heartbeat_at"] == STALE
    assert after["started_at"] == started
    assert [(r.id, r.previous_status, r.last_seen, r.last_seen_at) for r in unlocked] == [
        (run_id, "running", "heartbeat", STALE)
    ]
    assert unlocked[0].error_message == message
    assert unlocked[0].duration_ms == after["duration_ms"]


def test_running_without_heartbeat_is_judged_by_started_at(clean_db: str, engine: Engine) -> None:
    run_id = add_run(engine, "running", created_at=OLD_START, started_at=STALE)

    with freeze_time(NOW):
        unlocked = unlock_stale_runs(clean_db)  # a URL: the function makes its own engine

    after = row(engine, run_id)
    assert after["status"] == "failed"
    assert after["finished_at"] == NOW
    assert after["duration_ms"] == 20 * 60 * 1000
    assert after["error_message"] == (
        f"{PREFIX}: status was running, started 2026-01-27T10:00:00Z, no heartbeat (older than 15m)"
    )
    assert unlocked[0].last_seen == "started"


def test_stale_queued_run_is_failed_with_duration_from_created_at(engine: Engine) -> None:
    run_id = add_run(engine, "queued", created_at=STALE)

    with freeze_time(NOW):
        unlocked = unlock_stale_runs(engine)

    after = row(engine, run_id)
    assert after["status"] == "failed"
    assert after["started_at"] is None
    assert after["finished_at"] == NOW
    assert after["duration_ms"] == 20 * 60 * 1000
    assert after["error_message"] == (
        f"{PREFIX}: status was queued, created 2026-01-27T10:00:00Z, never started (older than 15m)"
    )
    assert [(r.id, r.previous_status, r.last_seen) for r in unlocked] == [
        (run_id, "queued", "created")
    ]


def test_runs_with_a_fresh_sign_of_life_are_untouched(engine: Engine) -> None:
    cutoff = NOW - timedelta(minutes=15)
    add_run(engine, "running", created_at=OLD_START, started_at=FRESH, heartbeat_at=FRESH)
    # Started long ago, but the heartbeat says it is alive: the heartbeat wins.
    add_run(engine, "running", created_at=OLD_START, started_at=OLD_START, heartbeat_at=FRESH)
    add_run(engine, "running", created_at=OLD_START, started_at=FRESH)
    add_run(engine, "queued", created_at=FRESH)
    # Exactly at the bound is not older than it.
    add_run(engine, "running", created_at=OLD_START, started_at=OLD_START, heartbeat_at=cutoff)
    add_run(engine, "queued", created_at=cutoff)
    before = rows(engine)

    with freeze_time(NOW):
        assert unlock_stale_runs(engine) == []

    assert rows(engine) == before


def test_terminal_runs_are_never_touched(engine: Engine) -> None:
    long_ago = NOW - timedelta(days=30)
    for status in ("success", "failed"):
        add_run(
            engine,
            status,
            created_at=long_ago,
            started_at=long_ago,
            heartbeat_at=long_ago,
            finished_at=long_ago + timedelta(minutes=1),
            duration_ms=60_000,
            error_message=None if status == "success" else "ValueError: boom",
        )
    # Failed before it ever started (its message never reached the broker).
    add_run(engine, "failed", created_at=long_ago, finished_at=long_ago, duration_ms=0)
    before = rows(engine)

    with freeze_time(NOW):
        assert unlock_stale_runs(engine) == []
        assert unlock_stale_runs(engine, dry_run=True) == []

    assert rows(engine) == before


def test_dry_run_lists_what_it_would_write_and_changes_nothing(engine: Engine) -> None:
    running = add_run(
        engine, "running", created_at=OLD_START, started_at=OLD_START, heartbeat_at=STALE
    )
    queued = add_run(engine, "queued", created_at=STALE)
    add_run(engine, "running", created_at=OLD_START, started_at=OLD_START, heartbeat_at=FRESH)
    before = rows(engine)

    with freeze_time(NOW):
        planned = unlock_stale_runs(engine, dry_run=True)
        assert rows(engine) == before
        done = unlock_stale_runs(engine)

    assert [r.id for r in planned] == [running, queued]
    assert planned == done  # the preview is exactly what the real run then wrote


def test_second_call_unlocks_nothing_and_changes_nothing(engine: Engine) -> None:
    add_run(engine, "running", created_at=OLD_START, started_at=OLD_START, heartbeat_at=STALE)
    add_run(engine, "queued", created_at=STALE)

    with freeze_time(NOW):
        assert len(unlock_stale_runs(engine)) == 2
    after_first = rows(engine)
    # Later, with a longer "now": the failed runs must keep their first finished_at.
    with freeze_time(NOW + timedelta(hours=1)):
        assert unlock_stale_runs(engine) == []

    assert rows(engine) == after_first


def test_project_id_narrows(engine: Engine) -> None:
    mine = add_run(engine, "queued", created_at=STALE, project_id=1)
    theirs = add_run(engine, "queued", created_at=STALE, project_id=2)

    with freeze_time(NOW):
        unlocked = unlock_stale_runs(engine, project_id=1)

    assert [r.id for r in unlocked] == [mine]
    assert row(engine, mine)["status"] == "failed"
    assert row(engine, theirs)["status"] == "queued"


def test_older_than_sets_the_bound_and_the_message(engine: Engine) -> None:
    twenty_min = add_run(engine, "queued", created_at=STALE)
    three_hours = add_run(engine, "queued", created_at=NOW - timedelta(hours=3))

    unlocked = unlock_stale_runs(engine, older_than=timedelta(hours=2), now=NOW)

    assert [r.id for r in unlocked] == [three_hours]
    assert unlocked[0].error_message.endswith("(older than 2h)")
    assert row(engine, twenty_min)["status"] == "queued"


def test_now_parameter_overrides_the_clock(engine: Engine) -> None:
    run_id = add_run(engine, "queued", created_at=STALE)

    # Without freezegun, the real clock is far from NOW; the parameter decides.
    unlocked = unlock_stale_runs(engine, now=STALE + timedelta(minutes=10))

    assert unlocked == []
    assert row(engine, run_id)["status"] == "queued"


def test_a_row_a_worker_is_writing_is_skipped_not_waited_for(engine: Engine) -> None:
    run_id = add_run(
        engine, "running", created_at=OLD_START, started_at=OLD_START, heartbeat_at=STALE
    )

    # A worker's heartbeat, in flight: it holds the row lock and has not committed yet.
    with engine.connect() as worker:
        worker.begin()
        worker.execute(update(IngestRun).where(IngestRun.id == run_id).values(heartbeat_at=FRESH))
        # The engine's lock_timeout turns a wait into an error, so returning at all proves
        # the row was skipped.
        assert unlock_stale_runs(engine, now=NOW) == []
        worker.commit()

    # Once the heartbeat has landed, the run is fresh and stays untouched.
    assert unlock_stale_runs(engine, now=NOW) == []
    assert row(engine, run_id)["status"] == "running"


def test_unlocking_frees_the_one_active_run_slot(engine: Engine) -> None:
    stale = add_run(engine, "queued", created_at=STALE, job_code="frontend_prices")

    unlock_stale_runs(engine, now=NOW)
    fresh = add_run(engine, "queued", created_at=NOW, job_code="frontend_prices")

    assert row(engine, stale)["status"] == "failed"
    assert row(engine, fresh)["status"] == "queued"


def test_rejects_a_non_positive_bound_and_a_naive_now(clean_db: str) -> None:
    with pytest.raises(ValueError, match="older_than must be positive"):
        unlock_stale_runs(clean_db, older_than=timedelta(0))
    with pytest.raises(ValueError, match="timezone-aware"):
        unlock_stale_runs(clean_db, now=NOW.replace(tzinfo=None))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", timedelta(minutes=15)),
        ("90s", timedelta(seconds=90)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("15", timedelta(minutes=15)),
        (" 30M ", timedelta(minutes=30)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "m", "15x", "1.5h", "-5m", "15 minutes", "1h30m", "0m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(minutes=15), "15m"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=2), "2h"),
        (timedelta(days=1, hours=2), "1d2h"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(0), "0s"),
    ],
)
def test_format_duration(value: timedelta, expected: str) -> None:
    assert format_duration(value) == expected


# --- the command line ---------------------------------------------------------------------


@pytest.fixture
def url_with_password(clean_db: str) -> str:
    """The database URL with a password in it, to prove the output masks it."""
    url = make_url(clean_db)
    if url.password is None:
        # The local server trusts the connection, so this password is sent but not checked.
        url = url.set(password="s3cret-pw")
    return url.render_as_string(hide_password=False)


def test_cli_unlocks_and_prints_one_line_per_run_and_a_summary(
    url_with_password: str, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    running = add_run(
        engine,
        "running",
        created_at=OLD_START,
        started_at=OLD_START,
        heartbeat_at=STALE,
        job_code="frontend_prices",
    )
    queued = add_run(engine, "queued", created_at=STALE, job_code="stocks")
    add_run(engine, "queued", created_at=FRESH)

    with freeze_time(NOW):
        code = main(["--database-url", url_with_password])

    out, err = capsys.readouterr()
    masked = make_url(url_with_password).render_as_string(hide_password=True)
    assert code == 0
    assert err == ""
    assert out.splitlines() == [
        f"unlocked run {running}: project 1, marketplace ozon, job frontend_prices, "
        "was running, last heartbeat 2026-01-27T10:00:00Z",
        f"unlocked run {queued}: project 1, marketplace ozon, job stocks, was queued, "
        "created 2026-01-27T10:00:00Z, never started",
        f"unlocked 2 stale runs (older than 15m) in {masked}",
    ]
    password = make_url(url_with_password).password
    assert password
    assert password not in out
    assert "***" in out
    assert {row(engine, running)["status"], row(engine, queued)["status"]} == {"failed"}


def test_cli_dry_run_lists_and_changes_nothing(
    clean_db: str, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = add_run(engine, "running", created_at=OLD_START, started_at=STALE, project_id=7)
    add_run(engine, "queued", created_at=STALE, project_id=8)
    before = rows(engine)

    with freeze_time(NOW):
        code = main(
            ["--database-url", clean_db, "--dry-run", "--older-than", "10", "--project-id", "7"]
        )

    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert code == 0
    assert len(lines) == 2
    assert lines[0].startswith(f"would unlock run {run_id}: project 7, marketplace ozon, job ")
    assert lines[0].endswith(", was running, started 2026-01-27T10:00:00Z, no heartbeat")
    assert lines[1].startswith("dry run: 1 stale run would be unlocked (older than 10m, project 7)")
    assert lines[1].endswith("; nothing was changed")
    assert rows(engine) == before


def test_cli_with_nothing_stale(clean_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--database-url", clean_db, "--older-than", "90s"]) == 0

    out, _ = capsys.readouterr()
    assert out.startswith("unlocked 0 stale runs (older than 1m30s) in postgresql")


@pytest.mark.parametrize("value", ["15x", "0", "1.5h"])
def test_cli_rejects_a_bad_older_than(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--older-than", value])

    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --older-than: invalid duration" in err
    if value != "0":
        assert "90s, 15m, 2h, 1d" in err
        assert "plain minutes" in err


def test_cli_reads_app_database_url_by_default(
    clean_db: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = add_run(engine, "queued", created_at=STALE)
    monkeypatch.setenv("APP_DATABASE_URL", clean_db)
    get_settings.cache_clear()
    try:
        with freeze_time(NOW):
            assert main([]) == 0
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()

    assert row(engine, run_id)["status"] == "failed"


def test_cli_reports_an_unreachable_database_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "postgresql+psycopg2://someone:s3cret-pw@/nodb?host=/nonexistent-socket-dir"

    assert main(["--database-url", url]) == 1

    err = capsys.readouterr().err
    assert err.startswith("unlock_stale_runs: failed on postgresql+psycopg2://someone:***@/nodb")
    assert "s3cret-pw" not in err


@pytest.mark.parametrize(
    "entry",
    [["scripts/unlock_stale_runs.py"], ["-m", "scripts.unlock_stale_runs"]],
    ids=["as-file", "as-module"],
)
def test_script_runs_as_a_real_process(entry: list[str], clean_db: str, engine: Engine) -> None:
    # Long ago by any real clock, so the process (not frozen) sees it as stale.
    run_id = add_run(engine, "queued", created_at=datetime(2020, 1, 1, tzinfo=UTC))
    before = rows(engine)

    proc = subprocess.run(
        [sys.executable, "-W", "error", *entry, "--database-url", clean_db, "--dry-run"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"would unlock run {run_id}: project 1, marketplace ozon, job ")
    assert lines[0].endswith(", was queued, created 2020-01-01T00:00:00Z, never started")
    assert lines[1].startswith("dry run: 1 stale run would be unlocked (older than 15m)")
    assert rows(engine) == before
