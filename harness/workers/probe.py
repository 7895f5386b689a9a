"""What a run leaves behind in its worker process, counted by the shim after each run.

The field's "attached to a different loop" and "Event loop is closed" start with something
loop-bound that outlives the run that made it: a loop left open, a task left pending on a loop
that is gone, a helper thread that never ends, a database connection never closed. After each
run the shim logs one line (``PROBE_TEMPLATE``) with:

- ``open_loops``: asyncio loops made in this process (since the shim was installed) that are
  not closed, other than one the shim itself keeps;
- ``pending_tasks``: tasks of those loops, open or closed, that never finished;
- ``new_threads``: threads started during the run and alive after it, with their names;
- ``db_connections``: this process's TCP connections to the database's port, after the run
  minus before it.

Loops are registered by wrapping ``asyncio.BaseEventLoop.__init__``, so uvloop's loops (not
that class) are not counted. With several runs in flight in one process (threads, gevent)
another run's loop and connections are counted too: the scenarios assert the probe on runs
made one at a time.
"""

from __future__ import annotations

import _socket
import asyncio
import functools
import os
import stat
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["PROBE_TEMPLATE", "Probe", "RunLeftovers", "install", "tcp_connections_to"]

PROBE_TEMPLATE: Final = (
    "after run {run_id}: open_loops={open_loops} pending_tasks={pending_tasks} "
    "new_threads={new_threads} db_connections={db_connections:+d}"
)

_INET: Final = (_socket.AF_INET, _socket.AF_INET6)
_TCP_INFO: Final = getattr(_socket, "TCP_INFO", 11)  # Linux's value where Python lacks it
_TCP_ESTABLISHED: Final = 1  # tcpi_state, the first byte of struct tcp_info
_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_installed = False


def install() -> None:
    """Register every asyncio loop made from now on (idempotent)."""
    global _installed
    if _installed:
        return
    original = asyncio.BaseEventLoop.__init__

    @functools.wraps(original)
    def init(self: asyncio.BaseEventLoop, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _loops.add(self)

    asyncio.BaseEventLoop.__init__ = init  # type: ignore[method-assign,assignment]
    _installed = True


def tcp_connections_to(port: int) -> int:
    """How many of this process's sockets are established TCP connections to ``port``.

    Asks each of the process's own sockets (a duplicate of its descriptor, closed again) for
    its peer and its TCP state, rather than reading the machine's whole TCP table from
    /proc/net/tcp: that table holds every socket of the network namespace (650 rows on this
    shared machine, 3 ms a read), this is a few system calls per socket. The C ``_socket``
    module, so that gevent's patching cannot get in the way. Linux; elsewhere 0.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    count = 0
    for name in names:
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            dup = os.dup(fd)
        except (OSError, ValueError):
            continue  # gone meanwhile (listdir's own descriptor is one of them)
        try:
            sock = _socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        try:
            if sock.family in _INET and sock.type == _socket.SOCK_STREAM:
                peer_port = sock.getpeername()[1]
                state = sock.getsockopt(_socket.IPPROTO_TCP, _TCP_INFO, 1)[0]
                count += peer_port == port and state == _TCP_ESTABLISHED
        except OSError:
            pass  # not connected
        finally:
            sock.close()  # the duplicate only: the process's own socket stays open
    return count


@dataclass(frozen=True, slots=True)
class RunLeftovers:
    open_loops: int
    pending_tasks: int
    new_threads: tuple[str, ...]
    db_connections: int

    def line(self, run_id: object) -> str:
        return PROBE_TEMPLATE.format(
            run_id=run_id,
            open_loops=self.open_loops,
            pending_tasks=self.pending_tasks,
            new_threads=",".join(self.new_threads) or "none",
            db_connections=self.db_connections,
        )


class Probe:
    """Taken before a run (:meth:`before`), read after it (:meth:`after`)."""

    def __init__(self, db_port: int | None) -> None:
        self._db_port = db_port

    def before(self) -> tuple[frozenset[int], int]:
        threads = frozenset(t.ident for t in threading.enumerate() if t.ident is not None)
        conns = tcp_connections_to(self._db_port) if self._db_port else 0
        return threads, conns

    def after(self, before: tuple[frozenset[int], int]) -> RunLeftovers:
        threads_before, conns_before = before
        loops = list(_loops)
        open_loops = [loop for loop in loops if not loop.is_closed()]
        pending = 0
        for loop in loops:
            try:
                pending += sum(1 for task in asyncio.all_tasks(loop) if not task.done())
            except RuntimeError:  # the set changed size: a task of another run finished
                continue
        new = tuple(
            sorted(
                t.name
                for t in threading.enumerate()
                if t.ident not in threads_before and t.is_alive()
            )
        )
        conns = tcp_connections_to(self._db_port) if self._db_port else 0
        return RunLeftovers(len(open_loops), pending, new, conns - conns_before)
