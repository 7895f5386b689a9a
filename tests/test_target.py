"""harness.target: a Target is checked when it is built and when it is named (unit tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.core.target import (
    LogContract,
    RunTable,
    Target,
    TargetError,
    default_target_spec,
    load_target,
)


def _target(**changes: object) -> Target:
    fields: dict[str, object] = {
        "name": "t",
        "celery_app": "pkg.app:celery",
        "task_name": "pkg.task",
        "runner": "pkg.bridge:run",
        "env_prefix": "T_",
        "broker_url_env": "T_BROKER_URL",
        "database_url_env": "T_DATABASE_URL",
        "migrate": "pkg.schema:migrate",
        "runs": RunTable(table="jobs", columns=("id", "status")),
        "logs": LogContract("pkg.task", "pkg.bridge", "start {run_id}", "ok {run_id}", "bad"),
    }
    fields.update(changes)
    return Target(**fields)  # type: ignore[arg-type]


def test_a_target_gives_a_worker_its_environment() -> None:
    target = _target(worker_env={"T_QUICK": "1"})
    env = target.app_env(database_url="postgresql://db", broker_url="redis://b", T_X="2")
    assert env == {
        "T_DATABASE_URL": "postgresql://db",
        "T_BROKER_URL": "redis://b",
        "T_QUICK": "1",
        "T_X": "2",
    }
    with pytest.raises(TypeError):
        target.worker_env["T_QUICK"] = "2"  # type: ignore[index]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runner": "no colon"}, "runner must be 'package.module:NAME'"),
        ({"broker_url_env": "BROKER"}, "broker_url_env must start with T_"),
        ({"runs": None}, None),
    ],
)
def test_a_wrong_target_is_refused_when_built(
    changes: dict[str, object], message: str | None
) -> None:
    if message is None:
        with pytest.raises(TargetError, match="columns lack"):
            RunTable(table="jobs", columns=("id",))
        with pytest.raises(TargetError, match="plain lower-case SQL names"):
            RunTable(table="jobs; DROP", columns=("id", "status"))
        return
    with pytest.raises(TargetError, match=message):
        _target(**changes)


def test_a_target_is_named_by_the_variable_then_the_ini(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nharness_target = a.b:C\n")
    assert default_target_spec({}, tmp_path) == "a.b:C"
    assert default_target_spec({"HARNESS_TARGET": "x.y:Z"}, tmp_path) == "x.y:Z"
    with pytest.raises(TargetError, match=r"set harness_target = package\.module:NAME"):
        default_target_spec({}, tmp_path / "elsewhere")


def test_loading_names_what_is_wrong() -> None:
    with pytest.raises(TargetError, match="cannot import 'nowhere'"):
        load_target("nowhere:TARGET")
    with pytest.raises(TargetError, match="has no attribute 'NOPE'"):
        load_target("fixtures.target:NOPE")
    with pytest.raises(TargetError, match="not a harness Target"):
        load_target("app.config:Settings")
    assert load_target("fixtures.target:INGEST").runs.table == "ingest_runs"


ROOT = Path(__file__).resolve().parent.parent


def test_a_target_in_a_checkout_puts_the_checkout_on_a_childs_path() -> None:
    # fixtures/ and app/ are not installed (the wheel is harness alone): a worker or xdist
    # process finds them only through PYTHONPATH.
    target = load_target("fixtures.target:INGEST")
    path = target.pythonpath("fixtures.target:INGEST", f"/elsewhere{os.pathsep}{ROOT}")
    assert path is not None
    assert path.split(os.pathsep) == [str(ROOT), "/elsewhere"]


def test_a_target_of_installed_packages_adds_nothing_to_the_path() -> None:
    target = _target(celery_app="celery.app:Celery", runner="asyncio:run", migrate="json:dumps")
    assert target.import_roots("celery:Celery") == ()
    assert target.pythonpath("celery:Celery", None) is None


def test_a_bad_new_field_is_refused_naming_it() -> None:
    with pytest.raises(TargetError, match=r"api must be 'package\.module:NAME'"):
        _target(api="not a spec")
    with pytest.raises(TargetError, match="upstream_url_env must start with T_"):
        _target(upstream_url_env="MARKETPLACE_URL")
    with pytest.raises(TargetError, match=r"columns lack \['project_id'\]"):
        RunTable(table="jobs", columns=("id", "status"), insert={"project_id": 1})
