"""A small report service: a Celery task builds a report with async code (docs/own-app.md).

Different from the ingestion service on every point the harness must not assume: its table
(``report_jobs``), its states (``pending``, ``building``, ``done``, ``error``), its settings
(``REPORTS_*``), its log lines, and its own sync-to-async bridge (``examples.reports.bridge``).
"""
