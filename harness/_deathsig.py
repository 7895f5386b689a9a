"""Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) for the processes the harness
starts: the kernel sends it to a child when the thread that forked it exits.

Standard library only: the fork server's program (``harness.workers._forkserver``) imports it
too. Look the function up in the parent, before the fork: in a forked child of a threaded
process only the call itself is safe.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from typing import Final

__all__ = ["PR_SET_PDEATHSIG", "load_prctl"]

PR_SET_PDEATHSIG: Final = 1


def load_prctl() -> Callable[[int, int], int] | None:
    """``prctl(option, arg)``, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int

    def prctl(option: int, arg: int) -> int:
        return int(fn(option, arg, 0, 0, 0))

    return prctl
