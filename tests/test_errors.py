"""Every error class the harness defines has one root, HarnessError, drawn in
harness.core.errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import harness
from harness.core import errors


def _harness_modules() -> list[str]:
    names = [
        info.name
        for info in pkgutil.walk_packages(harness.__path__, prefix="harness.")
        # Worker apps configure Celery on import; the launcher and the plugin are entry points.
        if not info.name.endswith(("worker_app", "__main__"))
    ]
    return sorted(names)


def test_every_public_error_derives_from_harness_error() -> None:
    strays = []
    for name in _harness_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if not inspect.isclass(value) or value.__module__ != name or attr.startswith("_"):
                continue
            if issubclass(value, BaseException) and not issubclass(value, errors.HarnessError):
                strays.append(f"{name}.{attr}")
    assert not strays, f"errors outside the HarnessError tree: {strays}"


def test_the_tree_in_the_docstring_names_every_error() -> None:
    doc = errors.__doc__ or ""
    for name in _harness_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and value.__module__ == name
                and not attr.startswith("_")
                and issubclass(value, errors.HarnessError)
                and value.__module__ != "harness.matrix.cli"
            ):
                assert attr in doc, f"{name}.{attr} is missing from harness.core.errors' tree"
