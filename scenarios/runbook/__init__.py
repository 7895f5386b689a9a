"""The runbook (``execute-ingest-runbook.ru.md``), steps 2-6, automated on the real stack."""
