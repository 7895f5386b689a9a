"""The interpreter axis: Celery workers on another CPython, in a venv of their own.

``--python 3.12`` (ini ``harness_python``, ``HARNESS_PYTHON``) runs a session's Celery workers
on CPython 3.12 while pytest stays where it is. The interpreter is found on PATH and in the
usual managers' folders (:func:`find_interpreter`); the workers' venv, with the project's
runtime dependencies and gevent, is built once per interpreter and set of dependencies
(:func:`worker_python`) and reused. The workers import the harness, the Target and the app from
the checkout, as on the harness's own interpreter. ``harness matrix --python 3.11,3.12,3.13``
runs the matrix once per version.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from harness.core.errors import SetupError, UsageError

__all__ = [
    "PYTHON_ENV",
    "SEARCHED",
    "SUPPORTED",
    "WORKER_PYTHON_ENV",
    "PythonNotFound",
    "default_cache",
    "find_interpreter",
    "parse_versions",
    "search_places",
    "worker_python",
]

#: The CPython versions the harness supports (pyproject's requires-python, up to the newest
#: tested): what the CI files in .github/workflows and docs/ci run the matrix on.
SUPPORTED: Final = ("3.11", "3.12", "3.13")

PYTHON_ENV: Final = "HARNESS_PYTHON"
# The interpreter the harness starts Celery workers with (harness.workers.process).
WORKER_PYTHON_ENV: Final = "HARNESS_WORKER_PYTHON"
# Where find_interpreter looks, as said to a user (search_places has the globs).
SEARCHED: Final = "PATH, pyenv, uv and asdf folders, /usr/local/bin, /usr/bin"
_VERSION_RE: Final = re.compile(r"^3\.\d{1,2}$")
# What the workers need besides the project's runtime dependencies: the gevent pool.
_EXTRA: Final = ("gevent>=24.2",)
_BUILD_TIMEOUT_S: Final = 900


class PythonNotFound(SetupError):
    """No interpreter of the version asked for is on this machine: its cells are skipped."""


def parse_versions(value: str, *, option: str) -> tuple[str, ...]:
    """``3.11,3.12`` as a tuple; a one-line error naming ``option`` otherwise."""
    versions = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in versions if not _VERSION_RE.match(v)]
    if not versions or bad:
        raise UsageError(
            f"{option}: {value!r} is not a list of CPython versions; "
            "give them as 3.11,3.12,3.13 (major.minor, comma-separated)"
        )
    return tuple(dict.fromkeys(versions))


def search_places(version: str, env: Mapping[str, str]) -> list[str]:
    """Where :func:`find_interpreter` looks, in order, as globs."""
    home = env.get("HOME", str(Path.home()))
    pyenv = env.get("PYENV_ROOT", f"{home}/.pyenv")
    name = f"python{version}"
    return [
        *(f"{d}/{name}" for d in env.get("PATH", "").split(os.pathsep) if d),
        f"{pyenv}/versions/{version}*/bin/{name}",
        f"{home}/.local/share/uv/python/cpython-{version}*/bin/{name}",
        f"{home}/.asdf/installs/python/{version}*/bin/{name}",
        f"/usr/local/bin/{name}",
        f"/usr/bin/{name}",
    ]


def _reports(path: str) -> str | None:
    try:
        done = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def find_interpreter(version: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The first interpreter of CPython ``version`` found, checked by running it; else None."""
    env = dict(os.environ if env is None else env)
    for pattern in search_places(version, env):
        for path in sorted(glob.glob(pattern), reverse=True):  # the newest patch release first
            if os.access(path, os.X_OK) and _reports(path) == version:
                return Path(path)
    return None


def default_cache(env: Mapping[str, str] | None = None) -> Path:
    """Where the workers' venvs live: ``$XDG_CACHE_HOME`` (or ``~/.cache``)/ingest-harness."""
    environ = os.environ if env is None else env
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ingest-harness" / "pythons"


def _requirements(root: Path) -> list[str]:
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [*project.get("dependencies", []), *_EXTRA]


def worker_python(
    version: str, *, root: Path, cache: Path, env: Mapping[str, str] | None = None
) -> Path:
    """The Python of a venv on CPython ``version`` with what the workers need, built once.

    Raises PythonNotFound (no such interpreter here) or SetupError (the venv could not be
    built: the pip output's tail). The venv's name carries a digest of the requirements, so a
    change of them builds a new one; a lock keeps xdist workers from building it twice.
    """
    environ = dict(os.environ if env is None else env)
    interpreter = find_interpreter(version, environ)
    if interpreter is None:
        raise PythonNotFound(
            f"no CPython {version} here (looked in {SEARCHED}): its cells are skipped; "
            f"install it, or drop it from --python / {PYTHON_ENV}"
        )
    requirements = _requirements(root)
    digest = hashlib.sha256("\n".join([str(interpreter), *requirements]).encode()).hexdigest()
    venv = cache / f"py{version}-{digest[:12]}"
    python = venv / "bin" / "python"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".ready").exists():
            return python
        _build(interpreter, venv, requirements)
    return python


def _build(interpreter: Path, venv: Path, requirements: Sequence[str]) -> None:
    staging = venv.with_name(venv.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    steps = [
        [str(interpreter), "-m", "venv", str(staging)],
        [str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements],
    ]
    for step in steps:
        done = subprocess.run(
            step, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise SetupError(
                f"could not build the workers' venv on {interpreter} ({' '.join(step[:4])} "
                f"exited {done.returncode}); the output's tail:\n{tail}"
            )
    (staging / ".ready").write_text(str(interpreter) + "\n", encoding="utf-8")
    shutil.rmtree(venv, ignore_errors=True)
    staging.rename(venv)
