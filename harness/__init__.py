"""ingest-harness: forces event-loop conditions inside real Celery workers of an app (its
Target, ``harness.core.target``) and checks what its task wrote.

The layers, bottom to top: ``core``, ``services``, ``workers``, ``checks``, ``matrix``,
``pytest`` (docs/architecture.md). The pytest plugin is ``harness.pytest.plugin``; the plain
classes (services, workers, assertions) are usable without pytest.
"""
