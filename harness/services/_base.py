"""What every backend hands back (`Services`), the errors they raise, and DSN helpers.

Errors (a branch of the harness's tree, harness.core.errors)::

    ServicesError                 base: what failed, what was checked, how to fix it
     ├── ServicesUnavailable      no backend can run here (or the chosen one cannot):
     │                            one entry per backend tried, each with its reason and fix
     └── ServiceStartError        a server was launched (or reached) but never became ready;
                                  carries the last lines of its log
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from harness.core.cell import SERVICE_MODES as CELL_SERVICE_MODES
from harness.core.cell import ServiceModeName
from harness.core.errors import SetupError

ServiceMode = ServiceModeName
Backend = Literal["docker", "local", "external", "compose"]

SERVICE_MODES: Final = CELL_SERVICE_MODES


class ServicesError(SetupError):
    """A service could not be provided. The message says what, what was checked, and the fix."""

    def __init__(
        self,
        what: str,
        *,
        checked: Iterable[str] = (),
        fix: str = "",
        log_tail: Sequence[str] = (),
        log_path: Path | None = None,
    ) -> None:
        self.what = what
        self.checked = tuple(checked)
        self.fix = fix
        self.log_tail = tuple(log_tail)
        self.log_path = log_path
        super().__init__(self._render())

    def __reduce__(self) -> tuple[Any, ...]:
        # The default pickles only the message (args) and calls __init__ with it, which these
        # keyword-rich constructors reject; errors must cross process boundaries intact.
        return (_rebuild, (type(self), self.args, self.__dict__.copy()))

    def _render(self) -> str:
        lines = [self.what]
        if self.checked:
            lines.append("Checked:")
            lines.extend(f"  - {item}" for item in self.checked)
        if self.log_tail:
            where = f" ({self.log_path})" if self.log_path else ""
            lines.append(f"Last log lines{where}:")
            lines.extend(f"  | {line}" for line in self.log_tail)
        if self.fix:
            lines.append(f"Hint: {self.fix}")
        return "\n".join(lines)


def _rebuild(cls: type[ServicesError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class ServiceStartError(ServicesError):
    """A server was started (or an external one reached) but did not become ready."""


@dataclass(frozen=True)
class ProbeResult:
    """Whether one backend can work here, what was looked at to decide, and the fix if not."""

    backend: Backend
    ok: bool
    detail: str
    fix: str = ""


ProbeFn = Callable[[Mapping[str, str]], ProbeResult]


class ServicesUnavailable(ServicesError):
    """No backend could provide the services; `attempts` holds one result per backend tried."""

    def __init__(self, mode: ServiceMode, attempts: Sequence[ProbeResult]) -> None:
        self.mode = mode
        self.attempts = tuple(attempts)
        if mode == "auto":
            what = "No service backend is available (mode 'auto' tried docker, local, external)."
            fix = (
                "fix one of the above, or choose a backend explicitly "
                "(--services=docker|local|external)."
            )
        else:
            what = f"The {mode!r} service backend is not available."
            fix = self.attempts[-1].fix if self.attempts else ""
        # An explicit mode has one attempt, whose fix is the Hint; auto lists a fix per backend.
        checked = [
            f"{a.backend}: {a.detail}"
            + (f"\n      fix: {a.fix}" if a.fix and mode == "auto" else "")
            for a in self.attempts
        ]
        super().__init__(what, checked=checked, fix=fix)


@dataclass(frozen=True, repr=False)
class Services:
    """Where the running services are. URLs may hold passwords: log `describe()`, not fields."""

    backend: Backend
    postgres_url: str
    postgres_admin_url: str
    redis_url: str
    amqp_url: str | None
    postgres_version: str
    redis_version: str
    # What ran, for reports: {"postgres": "image@sha256:...", "redis": ...} (containers only).
    images: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def masked(self) -> Services:
        """A copy with every password in every URL replaced by ``***``."""
        return dataclasses.replace(
            self,
            postgres_url=mask_dsn(self.postgres_url),
            postgres_admin_url=mask_dsn(self.postgres_admin_url),
            redis_url=mask_dsn(self.redis_url),
            amqp_url=None if self.amqp_url is None else mask_dsn(self.amqp_url),
        )

    def describe(self) -> str:
        """A few human lines (passwords masked), e.g. for a pytest report header."""
        m = self.masked()
        return "\n".join(
            [
                f"services: {m.backend}",
                f"  postgres {m.postgres_version}: {m.postgres_url}",
                f"  postgres admin: {m.postgres_admin_url}",
                f"  redis {m.redis_version}: {m.redis_url}",
                f"  amqp: {m.amqp_url or 'none'}",
                *(f"  {name} image: {image}" for name, image in m.images.items()),
            ]
        )

    def __repr__(self) -> str:
        # The default repr would print passwords into tracebacks and pytest's assertion output.
        fields = ", ".join(
            f"{f.name}={getattr(self.masked(), f.name)!r}" for f in dataclasses.fields(self)
        )
        return f"Services({fields})"


# user:password@ in the authority. Passwords get pasted unencoded, with '@' or '/' in them, so
# the password runs to the *last* '@' before any '?'/'#': an '@' in the query string is never
# taken for one, and when in doubt (an '@' in the path) we mask too much rather than too little.
_USERINFO = re.compile(
    r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@]*:)(?P<pw>[^?#]*)(?P<tail>@[^@?#]*(?:[?#].*)?)$",
    re.DOTALL,
)
_QUERY_PW = re.compile(r"(?i)([?&;](?:password|passwd|pwd|pass)=)[^&#;]*")
_KV_PW = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def mask_dsn(url: str) -> str:
    """`url` with any password replaced by ``***`` (URL userinfo, ``?password=``, libpq k=v).

    Works for postgresql(+driver)://, redis(s)://, amqp(s):// and the like, with or without
    a password; never raises: if the input cannot be read at all, it is masked whole.
    """
    try:
        text = url if isinstance(url, str) else str(url)
        if "://" in text:
            m = _USERINFO.match(text)
            if m and m.group("pw"):
                text = f"{m.group('head')}***{m.group('tail')}"
            return _QUERY_PW.sub(r"\1***", text)
        return _KV_PW.sub(r"\1***", text)
    except Exception:
        return "***"


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg2://...``) as a URI libpq/psycopg2 accepts."""
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"postgres(?:ql)?(?:\+\w+)?", scheme):
        raise ValueError(f"not a PostgreSQL URL: {mask_dsn(url)!r}")
    return f"postgresql://{rest}"


def sqlalchemy_pg_url(url: str) -> str:
    """`url` with the scheme normalized to ``postgresql+psycopg2``, the rest untouched."""
    return "postgresql+psycopg2://" + libpq_dsn(url).partition("://")[2]


def pg_database(url: str) -> str:
    """The database name in a PostgreSQL URL ('' when there is none)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(libpq_dsn(url)).path.lstrip("/"))


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (scheme, credentials and query kept as given)."""
    scheme, _, _ = url.partition("://")
    parts = urllib.parse.urlsplit(libpq_dsn(url))
    rebuilt = parts._replace(path="/" + urllib.parse.quote(name, safe=""))
    return scheme + "://" + urllib.parse.urlunsplit(rebuilt).partition("://")[2]


def show_value(row: tuple[object, ...] | None) -> str:
    """The single value of a one-row answer to ``SHOW ...``."""
    if row is None:
        raise RuntimeError("the server answered no row to a SHOW statement")
    return str(row[0])
