"""ingest-harness: the regression harness for the ingestion service's Celery task.

The pytest plugin lives in ``harness.pytest.plugin``; the plain classes (services, worker,
marketplace, assertions) are importable on their own and usable without pytest.
"""
