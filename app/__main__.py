"""``python -m app`` (``make run``): the whole stack on one machine, to follow the runbook by hand.

The launcher is a test tool, not part of the service, so it lives in the harness
(``harness.matrix.launch``); the service never imports the harness. This module hands the process
over to it (``exec``: the same process, its signals and exit code), with the arguments as given.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]

LAUNCHER = "harness.matrix.launch"


def main() -> None:
    os.execv(sys.executable, [sys.executable, "-m", LAUNCHER, *sys.argv[1:]])


if __name__ == "__main__":
    main()
