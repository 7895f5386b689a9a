"""What the tests that run or signal a child process share."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_program(program: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -c program`` in a process of its own, from the checkout, its output captured:
    for what cannot be undone in the test process (gevent's patching, a fork)."""
    return subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def sigint_as_in_a_terminal() -> None:
    """A ``preexec_fn``: SIGINT back to its default in the child, as in a terminal's foreground job.

    A shell starts background jobs with SIGINT ignored and children inherit that; in a session
    run that way (``make test &``, some CI runners) a test could not simulate Ctrl-C: Python
    installs its KeyboardInterrupt handler only where SIGINT is not ignored at start.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
