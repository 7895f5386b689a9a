"""``harness.workers.http.UvicornServer``: the live server the API and UI tests run against."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from harness.workers.http import ServerStartError, UvicornServer


def tiny_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"pong": "yes"}

    return app


def test_serves_on_a_free_port_until_stopped() -> None:
    server = UvicornServer(tiny_app())
    with server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{server.url}/ping").json() == {"pong": "yes"}
        port = server.port

    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "still listening after stop"
    with pytest.raises(RuntimeError, match="starts once"):
        server.start()


def test_a_failing_startup_is_reported_not_waited_for() -> None:
    @asynccontextmanager
    async def broken(_: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("the database is not there")
        yield  # type: ignore[unreachable]  # pragma: no cover - makes it a generator

    server = UvicornServer(FastAPI(lifespan=broken), start_timeout_s=5)
    with pytest.raises(ServerStartError, match="exited before it started serving"):
        server.start()


def test_a_taken_port_is_reported() -> None:
    with UvicornServer(tiny_app()) as first:
        second = UvicornServer(tiny_app(), port=first.port, start_timeout_s=5)
        with pytest.raises(ServerStartError, match="SystemExit"):
            second.start()


def test_port_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not running"):
        _ = UvicornServer(tiny_app()).port
