"""What the tests that signal a child process share."""

from __future__ import annotations

import signal


def sigint_as_in_a_terminal() -> None:
    """A ``preexec_fn``: SIGINT back to its default in the child, as in a terminal's foreground job.

    A shell starts background jobs with SIGINT ignored and children inherit that; in a session
    run that way (``make test &``, some CI runners) a test could not simulate Ctrl-C: Python
    installs its KeyboardInterrupt handler only where SIGINT is not ignored at start.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
