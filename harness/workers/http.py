"""A real uvicorn server on a free loopback port, in a thread: for tests that speak real HTTP.

``UvicornServer`` is a context manager: entering starts the server and waits (with a deadline)
until it accepts connections, leaving asks it to shut down and waits for the thread. If it does
not start, the error says why (the exception the server thread raised, or the timeout).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Final, Self

import uvicorn

from harness.core._lifecycle import StartStop
from harness.core.errors import SetupError

__all__ = ["ServerStartError", "UvicornServer"]

_POLL_S: Final = 0.01


class ServerStartError(SetupError):
    """uvicorn did not start serving before the deadline, or its thread died."""


class UvicornServer(StartStop):
    """Runs ``app`` with uvicorn on ``host``:``port`` (0 picks a free port) in a daemon thread.

    One-shot: started once, stopped once. ``log_level`` is uvicorn's (its access log is on at
    ``info`` and below); the app's lifespan runs (``lifespan="on"``).

    >>> with UvicornServer(create_app(settings)) as server:  # doctest: +SKIP
    ...     httpx.get(f"{server.url}/healthz")
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self._config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        self._server = uvicorn.Server(self._config)
        self._host = host
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._thread: threading.Thread | None = None
        self._used = False
        self._error: BaseException | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not running: use it as a context manager first")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, no trailing slash."""
        return f"http://{self._host}:{self.port}"

    def start(self) -> Self:
        if self._used:
            # uvicorn.Server keeps its exit flags: a stopped server cannot serve again.
            raise RuntimeError("a UvicornServer starts once; make a new one to serve again")
        self._used = True
        self._thread = threading.Thread(target=self._run, name="uvicorn-test-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise ServerStartError(
                    f"uvicorn exited before it started serving on {self._host}"
                    + (f": {self._error!r}" if self._error is not None else "")
                    + " (uvicorn's log on stderr says more)"
                ) from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"uvicorn did not start serving on {self._host} within "
                    f"{self._start_timeout_s:g} s; a lifespan startup that blocks would do that"
                )
            time.sleep(_POLL_S)
        self._port = int(self._server.servers[0].sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._server.should_exit = True
        thread.join(self._stop_timeout_s)
        if thread.is_alive():
            # Open keep-alive connections or a stuck request: stop waiting for them.
            self._server.force_exit = True
            thread.join(self._stop_timeout_s)
        self._thread = None
        self._port = None

    def _run(self) -> None:
        try:
            self._server.run()
        except BaseException as exc:
            # uvicorn exits with SystemExit on bind errors. Kept for start() to report:
            # re-raising in a thread would only print it.
            self._error = exc
