"""A Celery worker's thread stacks, on demand: the worker side and the harness side.

In the worker, :func:`dump_stacks_on_signal` has :mod:`faulthandler` write every thread's
stack to ``$HARNESS_STACKS_FILE`` on ``SIGUSR2``. faulthandler does it in C, from the signal
handler, so a worker whose main thread is stuck in a blocking call, or holds the GIL in a
loop, still answers; prefork's pool processes inherit the handler and the file across the
fork (Celery resets SIGTERM, SIGHUP, SIGUSR1 and a few others in them, not SIGUSR2). Celery's
own SIGUSR1 handler logs stacks too, but in Python, and only in the main process.

On the harness side, :func:`take_stacks` signals each process of the worker in turn and reads
what it appended. A process that does not catch SIGUSR2 (its handler was reset) is skipped and
said so: SIGUSR2's default action would kill it. Only OS threads are dumped: a gevent worker's
greenlets other than the running one are not shown.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Final

__all__ = ["STACKS_FILE_ENV", "STACKS_SIGNAL", "catches", "dump_stacks_on_signal", "take_stacks"]

STACKS_FILE_ENV: Final = "HARNESS_STACKS_FILE"
STACKS_SIGNAL: Final = signal.SIGUSR2
# A dump is written in one go; once the file stops growing for this long, it is whole.
_SETTLE_S: Final = 0.2
_WAIT_S: Final = 3.0
_POLL_S: Final = 0.02


def dump_stacks_on_signal(env: Mapping[str, str]) -> BinaryIO | None:
    """In the worker: on SIGUSR2, every thread's stack to ``$HARNESS_STACKS_FILE``.

    Returns the open file, which the caller must keep: faulthandler writes to its descriptor.
    """
    path = env.get(STACKS_FILE_ENV, "").strip()
    if not path:
        return None
    out = open(path, "ab", buffering=0)  # noqa: SIM115 - open for the process's lifetime
    faulthandler.register(STACKS_SIGNAL, file=out, all_threads=True, chain=False)
    return out


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (Linux's /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode("utf-8", errors="replace")


def take_stacks(path: Path, pids: Sequence[tuple[int, str]]) -> str:
    """Signal each (pid, role) in turn and return what each appended to ``path``."""
    blocks: list[str] = []
    for pid, role in pids:
        if not catches(pid, STACKS_SIGNAL):
            blocks.append(f"--- {role} (pid {pid}): no stacks: it does not catch SIGUSR2")
            continue
        start = _size(path)
        try:
            os.kill(pid, STACKS_SIGNAL)
        except ProcessLookupError:
            blocks.append(f"--- {role} (pid {pid}): gone before its stacks were taken")
            continue
        deadline = time.monotonic() + _WAIT_S
        last, stable_since = start, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(_POLL_S)
            size = _size(path)
            if size != last:
                last, stable_since = size, time.monotonic()
            elif size > start and time.monotonic() - stable_since >= _SETTLE_S:
                break
        text = _read_from(path, start).rstrip() if last > start else ""
        blocks.append(f"--- {role} (pid {pid}):\n{text or '(it wrote no stacks in time)'}")
    return "\n".join(blocks)
