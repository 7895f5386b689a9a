"""A real HTTP marketplace source on loopback, serving fixture data with fault knobs per code.

The ingestion jobs fetch from it in the tests and the scenarios (a Celery worker in another
process calls it over HTTP), and ``python -m harness.workers.marketplace --port 8081`` runs it for a
person. Knobs are set per marketplace code, so scenarios using distinct codes never disturb each
other, and also as server-wide defaults; another process sets them over ``/_control``.

HTTP surface::

    GET    /api/v1/{code}/{domain}?page=N   a page of frontend_prices or stocks (1-based)
    GET    /_health                         {"ok": true}
    GET    /_control/{code}                 effective knobs, request log, page counts
    POST   /_control/{code}                 JSON object of knobs: merged into that code's knobs
    POST   /_control                        JSON object of knobs: merged into the defaults
    DELETE /_control/{code}                 forget that code's knobs and request log
    DELETE /_control                        forget every code and the defaults

Knobs (see :class:`Knobs`): ``latency_s``, ``hang_s``, ``fail_first``, ``fail_always``,
``fail_status``, ``fail_pages`` (once each), ``fail_pages_always``, ``malformed_pages``,
``empty_pages``, ``oversized_pages``, ``revision``, ``page_size``, ``pages``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, Final, NamedTuple, Self, cast
from urllib.parse import parse_qs, unquote, urlsplit

from harness.core._lifecycle import StartStop

__all__ = [
    "DOMAINS",
    "Knobs",
    "Marketplace",
    "MarketplaceServer",
    "RequestLog",
    "ServedRequest",
    "main",
]

logger = logging.getLogger("harness.marketplace")

DOMAINS: Final = ("frontend_prices", "stocks")
_WAREHOUSES: Final = ("MSK-Podolsk", "SPB-Shushary", "KZN-Zelenodolsk")
# A bad knob must not make the server build millions of items in a request thread.
_MAX_ITEMS: Final = 1_000_000
_SET_KNOBS: Final = frozenset(
    {"fail_pages", "fail_pages_always", "malformed_pages", "empty_pages", "oversized_pages"}
)
# The "marketplace" label of an oversized page: a megabyte of it.
OVERSIZED_LABEL_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Knobs:
    """How the marketplace behaves for one code.

    - ``latency_s``: sleep before answering every request (a slow network).
    - ``hang_s``: another sleep before answering every request, meant to outlast the client's
      timeout; kept apart from ``latency_s`` so a scenario can combine both.
    - ``fail_first``: the first N requests of the code (any domain, counted from the last
      ``configure`` that set this knob, or from the reset) answer ``fail_status``.
    - ``fail_always``: every request answers ``fail_status`` (the marketplace keeps failing
      past the client's retries).
    - ``fail_status``: the status of ``fail_first``/``fail_always`` failures, 503 by default
      (429 and other 5xx are retried by the client too).
    - ``fail_pages``: each listed page answers 500 once per domain, then serves normally, so a
      retrying client recovers.
    - ``fail_pages_always``: each listed page answers 500 on every request.
    - ``malformed_pages``: each listed page answers 200 with a body that is not valid JSON.
    - ``empty_pages``: each listed page answers 200 with ``items: []``.
    - ``oversized_pages``: each listed page answers 200 with a JSON page whose ``marketplace``
      is a megabyte of ``X`` (:data:`OVERSIZED_LABEL_BYTES`): a mislabelled page whose error
      message, quoting it, is far past any bound on stored errors.
    - ``revision``: the data as of a later day: with revision r > 0 every item's price and
      discount price (or stock quantity) is r units higher, and its ``observed_at`` r hours
      later, the keys unchanged. A second run after ``revision=1`` must update every row it
      stored in the first, value for value.
    - ``page_size``: items per page (50).
    - ``pages``: exactly this many pages: the fixture data is cut, or extended with
      deterministic synthesized items (``SYN-...`` SKUs), to ``pages * page_size`` items.

    A page past the end answers 404 whatever the knobs say, unless the request already failed
    through ``fail_first``/``fail_always``.
    """

    latency_s: float = 0.0
    hang_s: float = 0.0
    fail_first: int = 0
    fail_always: bool = False
    fail_status: int = 503
    fail_pages: frozenset[int] = frozenset()
    fail_pages_always: frozenset[int] = frozenset()
    malformed_pages: frozenset[int] = frozenset()
    empty_pages: frozenset[int] = frozenset()
    oversized_pages: frozenset[int] = frozenset()
    revision: int = 0
    page_size: int = 50
    pages: int | None = None

    def merged(self, knobs: Mapping[str, Any]) -> Knobs:
        """These knobs with ``knobs`` applied on top, each value checked and converted."""
        return dataclasses.replace(self, **{k: _coerce(k, v) for k, v in knobs.items()})

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, frozenset) else value
        return out


KNOB_NAMES: Final = tuple(f.name for f in dataclasses.fields(Knobs))


def _coerce(name: str, value: Any) -> Any:
    """Check one knob's value (also what arrives as JSON over ``/_control``)."""
    if name not in KNOB_NAMES:
        raise ValueError(f"unknown knob {name!r}; known knobs: {', '.join(KNOB_NAMES)}")
    if name in _SET_KNOBS:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ValueError(f"knob {name!r} takes a list of page numbers, got {value!r}")
        pages = frozenset(value)
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in pages):
            raise ValueError(f"knob {name!r} takes page numbers >= 1, got {sorted(pages, key=str)}")
        return pages
    if name in ("latency_s", "hang_s"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"knob {name!r} takes seconds >= 0, got {value!r}")
        return float(value)
    if name == "fail_always":
        if not isinstance(value, bool):
            raise ValueError(f"knob 'fail_always' takes true or false, got {value!r}")
        return value
    if name == "pages" and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"knob {name!r} takes an integer, got {value!r}")
    if name == "fail_status" and not (400 <= value <= 599):
        raise ValueError(f"knob 'fail_status' takes an HTTP error status (400-599), got {value}")
    if name == "revision" and value < 0:
        raise ValueError(f"knob 'revision' takes an integer >= 0, got {value}")
    if name == "fail_first" and value < 0:
        raise ValueError(f"knob 'fail_first' takes a count >= 0, got {value}")
    if name in ("page_size", "pages") and value < 1:
        raise ValueError(f"knob {name!r} takes an integer >= 1, got {value}")
    return value


def _check_size(knobs: Knobs) -> Knobs:
    if knobs.pages is not None and knobs.pages * knobs.page_size > _MAX_ITEMS:
        raise ValueError(
            f"pages * page_size = {knobs.pages * knobs.page_size} items is more than this "
            f"server makes ({_MAX_ITEMS}); lower 'pages' or 'page_size'"
        )
    return knobs


class ServedRequest(NamedTuple):
    """One API request as answered: compares equal to a plain ``(path, status)`` tuple."""

    path: str
    status: int


@dataclass(frozen=True, slots=True)
class RequestLog:
    """The API requests one code received since its last reset."""

    count: int
    calls: tuple[ServedRequest, ...]
    # The most requests of this code being processed at the same time (the client's
    # concurrency, as the server saw it).
    max_in_flight: int

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[ServedRequest]:
        return iter(self.calls)

    def statuses(self) -> list[int]:
        return [c.status for c in self.calls]

    def as_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "calls": [list(c) for c in self.calls],
            "max_in_flight": self.max_in_flight,
        }


@dataclass(slots=True)
class _CodeState:
    overrides: dict[str, Any] = field(default_factory=dict)
    requests: int = 0
    fail_first_from: int = 0
    failed_once: set[tuple[str, int]] = field(default_factory=set)
    calls: list[ServedRequest] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes
    delay_s: float = 0.0


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def _error(status: int, message: str) -> _Reply:
    return _Reply(status, _json_bytes({"error": message, "status": status}))


def _parse_page(raw: str | None) -> int | None:
    """The ``page`` query parameter (1 when absent), or None when it is not a page number."""
    if raw is None:
        return 1
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        return None
    return int(raw)


def _default_data_dir() -> Path:
    return Path(str(resources.files("harness").joinpath("data")))


def _revised(domain: str, item: Mapping[str, Any], revision: int) -> dict[str, Any]:
    """``item`` as of ``revision``: same keys, every value that a later scrape changes moved."""
    out = dict(item)
    observed = datetime.fromisoformat(str(item["observed_at"]).replace("Z", "+00:00"))
    out["observed_at"] = (observed + timedelta(hours=revision)).strftime("%Y-%m-%dT%H:%M:%SZ")
    if domain == "frontend_prices":
        for name in ("price", "discount_price"):
            if item.get(name) is not None:
                out[name] = str(Decimal(str(item[name])) + revision)
    else:
        out["quantity"] = int(item["quantity"]) + revision
    return out


def _synthesize(domain: str, index: int) -> dict[str, Any]:
    """A deterministic item that never collides with the fixture data's keys."""
    minute = index % 1440
    observed_at = f"2026-11-28T{minute // 60:02d}:{minute % 60:02d}:00Z"
    if domain == "frontend_prices":
        cents = 1000 + (index * 7919) % 990_000
        discount = None if index % 4 == 0 else cents - cents // 10
        return {
            "sku": f"SYN-{index:07d}",
            "price": f"{cents // 100}.{cents % 100:02d}",
            "currency": "RUB",
            "discount_price": None
            if discount is None
            else f"{discount // 100}.{discount % 100:02d}",
            "observed_at": observed_at,
        }
    return {
        "sku": f"SYN-{index // len(_WAREHOUSES):07d}",
        "warehouse": _WAREHOUSES[index % len(_WAREHOUSES)],
        "quantity": (index * 31) % 500,
        "observed_at": observed_at,
    }


class Marketplace:
    """The marketplace's state and answers, without the HTTP server (thread-safe)."""

    def __init__(self, data_dir: Path | None = None, **default_knobs: Any) -> None:
        directory = data_dir or _default_data_dir()
        self._data: dict[str, tuple[dict[str, Any], ...]] = {}
        for domain in DOMAINS:
            path = directory / f"{domain}.json"
            items = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(items, list):
                raise ValueError(f"{path} must hold a JSON list of items")
            self._data[domain] = tuple(items)
        self._lock = threading.Lock()
        self._initial_defaults = Knobs().merged(default_knobs)
        self._defaults = self._initial_defaults
        self._codes: dict[str, _CodeState] = {}

    # -- knobs -------------------------------------------------------------------------------

    def configure(self, code: str, **knobs: Any) -> None:
        """Merge ``knobs`` into ``code``'s knobs (they win over the server-wide defaults)."""
        with self._lock:
            # Validate everything before changing anything.
            _check_size(self._knobs_locked(code).merged(knobs))
            state = self._codes.setdefault(code, _CodeState())
            state.overrides.update({k: _coerce(k, v) for k, v in knobs.items()})
            self._restart_counters(state, knobs)

    def configure_defaults(self, **knobs: Any) -> None:
        """Merge ``knobs`` into the server-wide defaults (for every code without its own)."""
        with self._lock:
            self._defaults = _check_size(self._defaults.merged(knobs))
            for state in self._codes.values():
                self._restart_counters(state, knobs)

    @staticmethod
    def _restart_counters(state: _CodeState, knobs: Mapping[str, Any]) -> None:
        # "The first N requests" means the next N from now, not counting earlier traffic.
        if "fail_first" in knobs:
            state.fail_first_from = state.requests
        if "fail_pages" in knobs:
            state.failed_once.clear()

    def reset(self, code: str | None = None) -> None:
        """Forget ``code``'s knobs and request log; with no code, every code and the defaults."""
        with self._lock:
            if code is None:
                self._codes.clear()
                self._defaults = self._initial_defaults
            else:
                self._codes.pop(code, None)

    def defaults(self) -> Knobs:
        """The server-wide knobs, for every code without its own."""
        with self._lock:
            return self._defaults

    def knobs(self, code: str) -> Knobs:
        """The knobs in force for ``code``: the defaults with its own knobs on top."""
        with self._lock:
            return self._knobs_locked(code)

    def _knobs_locked(self, code: str) -> Knobs:
        state = self._codes.get(code)
        if state is None or not state.overrides:
            return self._defaults
        return dataclasses.replace(self._defaults, **state.overrides)

    # -- observability -----------------------------------------------------------------------

    def requests(self, code: str) -> RequestLog:
        with self._lock:
            state = self._codes.get(code)
            if state is None:
                return RequestLog(count=0, calls=(), max_in_flight=0)
            return RequestLog(
                count=state.requests, calls=tuple(state.calls), max_in_flight=state.max_in_flight
            )

    def expected_pages(self, code: str, domain: str) -> int:
        """How many pages ``code``/``domain`` has under the current knobs."""
        knobs = self.knobs(code)
        return self._page_count(self._dataset(self._check_domain(domain), knobs), knobs)

    def served_stats(self, code: str, domain: str) -> dict[str, Any]:
        """What a successful run of ``code``/``domain`` must report in its stats_json, as
        keyword arguments of ``harness.checks.assertions.assert_run_succeeded``: the domain, the
        marketplace code, the items fetched (:meth:`expected`) and the pages."""
        return {
            "domain": domain,
            "marketplace": code,
            "fetched": len(self.expected(code, domain)),
            "pages": self.expected_pages(code, domain),
        }

    def expected(self, code: str, domain: str) -> list[dict[str, Any]]:
        """Exactly the items a client that retries gets for ``code``/``domain``.

        Pages answering ``items: []`` (``empty_pages``), invalid JSON (``malformed_pages``) or
        always 500 (``fail_pages_always``) contribute nothing; ``fail_pages`` pages do, since a
        retry gets them. Request-level failures (``fail_first``, ``fail_always``) and delays do
        not change the data, so they do not change this list either.
        """
        knobs = self.knobs(code)
        items = self._dataset(self._check_domain(domain), knobs)
        lost = (
            knobs.empty_pages
            | knobs.malformed_pages
            | knobs.fail_pages_always
            | knobs.oversized_pages
        )
        out: list[dict[str, Any]] = []
        for page in range(1, self._page_count(items, knobs) + 1):
            if page not in lost:
                out.extend(dict(i) for i in self._slice(items, knobs, page))
        return out

    # -- answering ---------------------------------------------------------------------------

    @staticmethod
    def _check_domain(domain: str) -> str:
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; known domains: {', '.join(DOMAINS)}")
        return domain

    def _dataset(self, domain: str, knobs: Knobs) -> Sequence[dict[str, Any]]:
        items = self._items(domain, knobs)
        if knobs.revision == 0:
            return items
        return [_revised(domain, item, knobs.revision) for item in items]

    def _items(self, domain: str, knobs: Knobs) -> Sequence[dict[str, Any]]:
        base = self._data[domain]
        if knobs.pages is None:
            return base
        _check_size(knobs)  # defaults changed later may have made a code's pages too many
        total = knobs.pages * knobs.page_size
        if total <= len(base):
            return base[:total]
        return [*base, *(_synthesize(domain, i) for i in range(len(base), total))]

    @staticmethod
    def _page_count(items: Sequence[Any], knobs: Knobs) -> int:
        # Page 1 always exists, so a client can learn that there is nothing to fetch.
        return max(1, math.ceil(len(items) / knobs.page_size))

    @staticmethod
    def _slice(
        items: Sequence[dict[str, Any]], knobs: Knobs, page: int
    ) -> Sequence[dict[str, Any]]:
        start = (page - 1) * knobs.page_size
        return items[start : start + knobs.page_size]

    def begin(self, code: str) -> None:
        """Count a request of ``code`` as in flight (paired with :meth:`end`)."""
        with self._lock:
            state = self._codes.setdefault(code, _CodeState())
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)

    def end(self, code: str, path: str, status: int) -> None:
        with self._lock:
            state = self._codes.setdefault(code, _CodeState())
            state.in_flight = max(0, state.in_flight - 1)
            state.calls.append(ServedRequest(path, status))

    def answer(self, code: str, domain: str, raw_page: str | None) -> _Reply:
        """Decide one API request's answer (and its delay), counting it for ``code``."""
        with self._lock:
            state = self._codes.setdefault(code, _CodeState())
            index = state.requests - state.fail_first_from
            state.requests += 1
            knobs = self._knobs_locked(code)
            delay = knobs.latency_s + knobs.hang_s
            if knobs.fail_always or index < knobs.fail_first:
                why = "fail_always" if knobs.fail_always else f"fail_first={knobs.fail_first}"
                reply = _error(knobs.fail_status, f"injected failure ({why}) for {code}")
                return dataclasses.replace(reply, delay_s=delay)
            page = _parse_page(raw_page)
            if page in knobs.fail_pages and (domain, page) not in state.failed_once:
                state.failed_once.add((domain, page))
                reply = _error(500, f"injected failure (fail_pages) of page {page}")
                return dataclasses.replace(reply, delay_s=delay)
        return dataclasses.replace(self._page_reply(code, domain, raw_page, knobs), delay_s=delay)

    def _page_reply(self, code: str, domain: str, raw_page: str | None, knobs: Knobs) -> _Reply:
        if domain not in DOMAINS:
            return _error(404, f"unknown domain {domain!r}; known domains: {', '.join(DOMAINS)}")
        page = _parse_page(raw_page)
        if page is None:
            return _error(400, f"page must be an integer >= 1, got {raw_page!r}")
        try:
            items = self._dataset(domain, knobs)
        except ValueError as exc:
            return _error(500, f"the marketplace's knobs for {code} are unusable: {exc}")
        pages = self._page_count(items, knobs)
        if page > pages:
            return _error(
                404, f"page {page} is past the end: {domain} for {code} has {pages} pages"
            )
        if page in knobs.fail_pages_always:
            return _error(500, f"injected failure (fail_pages_always) of page {page}")
        if page in knobs.malformed_pages:
            # Starts like a real page and stops mid-item: what a truncated proxy reply looks like.
            head = _json_bytes({"marketplace": code, "domain": domain, "page": page})
            return _Reply(200, head[:-1] + b', "items": [{"sku": ')
        payload = {
            "marketplace": "X" * OVERSIZED_LABEL_BYTES if page in knobs.oversized_pages else code,
            "domain": domain,
            "page": page,
            "pages": pages,
            "items": [] if page in knobs.empty_pages else list(self._slice(items, knobs, page)),
        }
        return _Reply(200, _json_bytes(payload))

    def describe(self, code: str) -> dict[str, Any]:
        """What ``GET /_control/{code}`` answers."""
        return {
            "code": code,
            "knobs": self.knobs(code).as_json(),
            "requests": self.requests(code).as_json(),
            "pages": {d: self.expected_pages(code, d) for d in DOMAINS},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops connections under a burst of concurrent clients, and a
    # dropped SYN costs the client a one-second retransmit.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], marketplace: Marketplace) -> None:
        self.marketplace = marketplace
        self.stopping = threading.Event()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server_version = "harness-marketplace/1"

    @property
    def _server(self) -> _Server:
        return cast(_Server, self.server)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        # A client that gave up (its timeout) closed the socket: there is nobody to answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._route(method)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        mp = self._server.marketplace
        if method == "GET" and len(parts) == 4 and parts[:2] == ["api", "v1"]:
            code, domain = parts[2], parts[3]
            page = parse_qs(url.query).get("page", [None])[-1]
            mp.begin(code)
            status = 500
            try:
                reply = mp.answer(code, domain, page)
                status = reply.status
                if reply.delay_s:
                    self._server.stopping.wait(reply.delay_s)
            finally:
                # Out of flight before the client can see the answer, so a client that sends
                # its next request on receipt is never counted twice at once.
                mp.end(code, self.path, status)
            self._send(reply)
            return
        if parts == ["_health"] and method == "GET":
            self._send(_Reply(200, _json_bytes({"ok": True})))
            return
        if parts[0] == "_control" and len(parts) <= 2:
            self._control(method, parts[1] if len(parts) == 2 else None)
            return
        self._send(_error(404, f"no route for {method} {url.path}"))

    def _control(self, method: str, code: str | None) -> None:
        mp = self._server.marketplace
        try:
            if method == "GET" and code is not None:
                self._send(_Reply(200, _json_bytes(mp.describe(code))))
                return
            if method == "POST":
                knobs = self._json_body()
                if code is None:
                    mp.configure_defaults(**knobs)
                else:
                    mp.configure(code, **knobs)
                knobs_now = mp.defaults() if code is None else mp.knobs(code)
                answer = {"ok": True, "code": code, "knobs": knobs_now.as_json()}
                self._send(_Reply(200, _json_bytes(answer)))
                return
            if method == "DELETE":
                mp.reset(code)
                self._send(_Reply(200, _json_bytes({"ok": True, "code": code})))
                return
        except ValueError as exc:
            self._send(_error(400, str(exc)))
            return
        self._send(_error(405, f"{method} is not allowed on {self.path}"))

    def _json_body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"the body must be a JSON object of knobs: {exc}") from exc
        if not isinstance(body, dict):
            raise ValueError(f"the body must be a JSON object of knobs, got {type(body).__name__}")
        return body

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status, HTTPStatus(reply.status).phrase)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)


class MarketplaceServer(StartStop):
    """The marketplace on ``host:port`` (0: a free port) in a daemon thread; a context manager.

    ``with MarketplaceServer() as mp: mp.url`` listens as soon as the block starts. The state
    methods (``configure``, ``reset``, ``requests``, ``expected`` ...) are the
    :class:`Marketplace`'s and work before ``start`` too.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        data_dir: Path | None = None,
        **default_knobs: Any,
    ) -> None:
        self.marketplace = Marketplace(data_dir, **default_knobs)
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    def start(self) -> Self:
        if self._server is not None:
            return self
        host, port = self._address
        try:
            server = _Server(self._address, self.marketplace)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"the marketplace could not listen on {host}:{port}: {exc.strerror}; "
                "pick another port, or 0 for a free one",
            ) from exc
        self._server = server
        self._port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"marketplace-{server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.stopping.set()  # wakes requests sleeping on latency_s / hang_s
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def port(self) -> int:
        """The port it listens on (still known after ``stop``, for messages)."""
        if self._port is None:
            raise RuntimeError("the marketplace is not started; use it as a context manager")
        return self._port

    @property
    def host(self) -> str:
        return self._address[0]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def configure(self, code: str, **knobs: Any) -> None:
        self.marketplace.configure(code, **knobs)

    def configure_defaults(self, **knobs: Any) -> None:
        self.marketplace.configure_defaults(**knobs)

    def reset(self, code: str | None = None) -> None:
        self.marketplace.reset(code)

    def knobs(self, code: str) -> Knobs:
        return self.marketplace.knobs(code)

    def requests(self, code: str) -> RequestLog:
        return self.marketplace.requests(code)

    def expected(self, code: str, domain: str) -> list[dict[str, Any]]:
        return self.marketplace.expected(code, domain)

    def expected_pages(self, code: str, domain: str) -> int:
        return self.marketplace.expected_pages(code, domain)

    def served_stats(self, code: str, domain: str) -> dict[str, Any]:
        return self.marketplace.served_stats(code, domain)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.workers.marketplace``: serve until Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.workers.marketplace",
        description=__doc__.splitlines()[0] if __doc__ else "",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port")
    parser.add_argument("--latency-s", type=float, default=0.0, help="default latency_s knob")
    parser.add_argument("--page-size", type=int, default=50, help="default page_size knob")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )

    stop = threading.Event()

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        server = MarketplaceServer(
            args.host, args.port, latency_s=args.latency_s, page_size=args.page_size
        ).start()
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with server:
        print(f"marketplace listening on {server.url} (Ctrl-C stops it)", flush=True)
        print(f"  try: curl '{server.url}/api/v1/demo/frontend_prices?page=1'", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
