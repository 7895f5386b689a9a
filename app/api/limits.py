"""Bounds on what a request may send, and validation errors in plain words.

- A body over ``APP_API_MAX_BODY_BYTES`` is refused with 413 before it is parsed: by its
  Content-Length when it says one, else as soon as the bytes read pass the bound.
- A 422 lists each problem as ``{"loc", "msg", "type"}`` (FastAPI's shape), in words a person
  can act on; it never echoes the input back (a megabyte body would come back a megabyte) nor
  shows a raw regular expression.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from fastapi import Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

__all__ = ["BodySizeLimit", "plain_validation_errors"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_MAX_MSG: Final = 200
# What a field's pattern means, said as its description says it (the schema keeps the pattern).
PLAIN_PATTERNS: Final = {
    "marketplace_code": "letters, digits, '_', '.', '-'; 1 to 64 characters",
}


class BodySizeLimit:
    """ASGI middleware: 413 for a request body larger than ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"{int(declared)} bytes")
            return
        if declared is not None:
            await self.app(scope, receive, send)  # within the bound: the server enforces it
            return
        # No Content-Length (chunked): read it all here, up to the bound, then hand it on.
        # The app's own body parsing would turn an error raised mid-read into a 400.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._refuse(send, f"more than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: str) -> None:
        body = json.dumps(
            {
                "detail": f"the request body is too large ({size}); the limit is "
                f"{self.max_bytes} bytes (APP_API_MAX_BODY_BYTES)"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status.HTTP_413_CONTENT_TOO_LARGE,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _plain(error: dict[str, Any]) -> str:
    field = str(error.get("loc", ("",))[-1])
    kind = str(error.get("type", ""))
    if kind == "string_pattern_mismatch" and field in PLAIN_PATTERNS:
        return f"{field} must be {PLAIN_PATTERNS[field]}"
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    if len(message) > _MAX_MSG:
        message = message[: _MAX_MSG - 3] + "..."
    return message


async def plain_validation_errors(request: Request, exc: Exception) -> JSONResponse:
    """The 422: each problem's location, a plain message and its type; never the input."""
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"loc": list(error.get("loc", ())), "msg": _plain(error), "type": error.get("type")}
        for error in exc.errors()[:20]
    ]
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
