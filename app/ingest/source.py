"""The marketplace source client: fetch a domain's pages over HTTP, with retries and clear errors.

Errors::

    SourceError                  anything that went wrong getting data from the marketplace
    ├── SourceUnavailableError   5xx, 429, connection errors or timeouts on every attempt
    ├── SourceHTTPError          another 4xx (a wrong URL, a page past the end): not retried
    └── SourceProtocolError      an answer of the wrong shape (also a malformed item)
        └── MalformedPageError   an answer that is not JSON at all: not retried

The client holds an ``httpx.AsyncClient``, which belongs to the event loop it was made in: make
it inside the job (``async with MarketplaceClient(settings) as client``), never at import time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import httpx

from app.config import Settings

__all__ = [
    "MalformedPageError",
    "MarketplaceClient",
    "Page",
    "SourceError",
    "SourceHTTPError",
    "SourceProtocolError",
    "SourceUnavailableError",
]

logger = logging.getLogger("app.ingest.source")

# A marketplace claiming more pages than this is answering nonsense, not data.
MAX_PAGES: Final = 10_000
_RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})


class SourceError(Exception):
    """Getting data from the marketplace failed."""


class SourceUnavailableError(SourceError):
    """The marketplace failed (5xx, 429, unreachable, too slow) on every attempt."""


class SourceHTTPError(SourceError):
    """The marketplace refused the request with a 4xx that a retry would not change."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class SourceProtocolError(SourceError):
    """The marketplace answered, but not with a page of the expected shape."""


class MalformedPageError(SourceProtocolError):
    """The marketplace answered 200 with a body that is not valid JSON."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a domain as the marketplace served it; ``number`` and ``pages`` are 1-based."""

    marketplace: str
    domain: str
    number: int
    pages: int
    items: list[dict[str, Any]]
    url: str

    def describe(self) -> str:
        """How error messages name this page."""
        return f"page {self.number} of {self.domain} for {self.marketplace} from {self.url}"


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle costs 15-40 ms, which a fresh client per run (each run may be on a
    # fresh loop, and an httpx client belongs to its loop) would pay every time. The context
    # itself is not loop-bound, so one per process serves every client.
    return httpx.create_ssl_context()


class MarketplaceClient:
    """Fetches pages of ``/api/v1/{code}/{domain}`` from ``settings.marketplace_url``."""

    def __init__(self, settings: Settings) -> None:
        self._base_url = settings.marketplace_url
        self._timeout_s = settings.http_timeout_s
        self._attempts = settings.http_retries + 1
        self._backoff_s = settings.http_retry_backoff_s
        self._concurrency = settings.http_concurrency
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        self._http = httpx.AsyncClient(
            base_url=self._base_url,
            timeout=httpx.Timeout(self._timeout_s),
            headers={"Accept": "application/json"},
            verify=_ssl_context(),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("use MarketplaceClient as 'async with MarketplaceClient(settings)'")
        return self._http

    async def fetch_page(self, domain: str, marketplace_code: str, page: int) -> Page:
        """One page, retrying 5xx, 429, connection errors and timeouts with exponential backoff."""
        http = self._client()
        path = f"/api/v1/{quote(marketplace_code, safe='')}/{quote(domain, safe='')}"
        request = http.build_request("GET", path, params={"page": page})
        url = str(request.url)
        failures: list[str] = []
        for attempt in range(1, self._attempts + 1):
            try:
                response = await http.send(request)
            except httpx.TimeoutException as exc:
                failures.append(
                    f"did not answer within {self._timeout_s:g} s ({type(exc).__name__})"
                )
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                failures.append(
                    f"could not be reached ({type(exc).__name__}: {str(exc) or 'no detail'})"
                )
            except httpx.UnsupportedProtocol as exc:
                raise SourceError(
                    f"cannot GET {url}: {exc}; APP_MARKETPLACE_URL must look like http://host:port"
                ) from exc
            else:
                if response.status_code in _RETRY_STATUSES:
                    failures.append(f"answered {response.status_code}")
                else:
                    return self._parse(response, domain, marketplace_code, page, url)
            if attempt < self._attempts:
                delay = self._backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "GET %s: %s (attempt %d of %d); retrying in %g s",
                    url,
                    failures[-1],
                    attempt,
                    self._attempts,
                    delay,
                )
                await asyncio.sleep(delay)
        raise SourceUnavailableError(self._unavailable_message(url, failures))

    def _unavailable_message(self, url: str, failures: list[str]) -> str:
        n = len(failures)
        if len(set(failures)) == 1:
            message = f"marketplace {failures[0]} for GET {url} on all {n} attempts"
        else:
            message = f"marketplace failed GET {url} on all {n} attempts: {'; '.join(failures)}"
        if any(f.startswith("could not be reached") for f in failures):
            message += f" (is the marketplace up at APP_MARKETPLACE_URL={self._base_url}?)"
        return message

    @staticmethod
    def _parse(
        response: httpx.Response, domain: str, marketplace_code: str, page: int, url: str
    ) -> Page:
        where = f"page {page} of {domain} for {marketplace_code} from {url}"
        if response.status_code != 200:
            raise SourceHTTPError(
                f"marketplace answered {response.status_code} for GET {url}: "
                f"{response.text[:300].strip() or '(empty body)'}",
                response.status_code,
            )
        try:
            body = response.json()
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise MalformedPageError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise SourceProtocolError(f"{where} is not a JSON object but {type(body).__name__}")
        pages = body.get("pages")
        items = body.get("items")
        problems: list[str] = []
        if body.get("marketplace") != marketplace_code:
            problems.append(f"'marketplace' is {body.get('marketplace')!r}")
        if body.get("domain") != domain:
            problems.append(f"'domain' is {body.get('domain')!r}")
        if body.get("page") != page:
            problems.append(f"'page' is {body.get('page')!r}")
        if not isinstance(pages, int) or isinstance(pages, bool) or not 1 <= pages <= MAX_PAGES:
            problems.append(f"'pages' is {pages!r}, not an integer from 1 to {MAX_PAGES}")
        if not isinstance(items, list):
            problems.append(f"'items' is {type(items).__name__}, not a list")
        elif not all(isinstance(i, dict) for i in items):
            problems.append("'items' holds something other than JSON objects")
        if problems:
            raise SourceProtocolError(f"{where} has the wrong shape: {'; '.join(problems)}")
        assert isinstance(pages, int) and isinstance(items, list)
        return Page(marketplace_code, domain, page, pages, items, url)

    async def fetch_all(self, domain: str, marketplace_code: str) -> AsyncGenerator[Page, None]:
        """Every page of ``domain``: page 1 first (it tells how many there are), then the rest
        concurrently (at most ``http_concurrency`` requests at once), as they arrive.

        Use it under ``contextlib.aclosing`` so stopping early cancels the fetches in flight.
        """
        first = await self.fetch_page(domain, marketplace_code, 1)
        semaphore = asyncio.Semaphore(self._concurrency)

        async def bounded(number: int) -> Page:
            async with semaphore:
                return await self.fetch_page(domain, marketplace_code, number)

        # Started before page 1 is handed over, so they download while the consumer stores it.
        tasks = [
            asyncio.create_task(bounded(n), name=f"fetch {domain} page {n}")
            for n in range(2, first.pages + 1)
        ]
        try:
            yield first
            for next_page in asyncio.as_completed(tasks):
                yield await next_page
        finally:
            # One page failed, or the consumer stopped: the other fetches are no longer wanted,
            # and gathering them keeps their errors from being reported as never retrieved.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
