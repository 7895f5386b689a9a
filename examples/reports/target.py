"""The report service as the harness sees it: the one module that says so."""

from __future__ import annotations

from harness.core.target import LogContract, RunTable, Target

REPORTS = Target(
    name="reports",
    celery_app="examples.reports.worker:celery_app",
    task_name="examples.reports.build",
    runner="examples.reports.bridge:run_coro",
    env_prefix="REPORTS_",
    broker_url_env="REPORTS_BROKER_URL",
    database_url_env="REPORTS_DATABASE_URL",
    migrate="examples.reports.schema:migrate",
    runs=RunTable(
        table="report_jobs",
        columns=(
            "id",
            "tenant",
            "kind",
            "state",
            "queued_at",
            "begun_at",
            "ended_at",
            "elapsed_ms",
            "result",
            "failure",
        ),
        status="state",
        terminal=("done", "error"),
        success="done",
    ),
    logs=LogContract(
        task_logger="examples.reports.task",
        runner_logger="examples.reports.bridge",
        starting="Building report {run_id}",
        completed="Report {run_id} built",
        failed="Report {run_id} failed: {error}",
    ),
)
