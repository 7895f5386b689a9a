"""Bearer tokens scoped to projects (``APP_API_TOKENS``: ``token=1,2;other=*``).

A missing or unknown token is a 401 with ``WWW-Authenticate: Bearer``. A project the token may
not see is a 404, exactly as if it did not exist, so a token never learns what other projects
hold. Tokens are compared in constant time against every configured token and never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from fastapi import HTTPException, status

__all__ = ["BEARER_CHALLENGE", "Principal", "TokenAuthenticator"]

logger = logging.getLogger("app.api.auth")

# RFC 6750: the bare scheme when no token came, plus error="invalid_token" for a wrong one.
BEARER_CHALLENGE: Final = "Bearer"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the projects the token may see (``None``: every project).

    Deliberately without the token itself, so it cannot end up in a log or a repr.
    """

    projects: frozenset[int] | None
    label: str

    def may_see(self, project_id: int) -> bool:
        return self.projects is None or project_id in self.projects


class TokenAuthenticator:
    """Resolves a presented bearer token to a ``Principal``, or raises the 401."""

    def __init__(self, scopes: Mapping[str, frozenset[int] | None]) -> None:
        # Bytes for compare_digest: it refuses non-ASCII str, and a header may carry any
        # latin-1 text. The label is what logs may say instead of the token.
        self._entries = [
            (token.encode("utf-8"), Principal(projects=projects, label=f"token #{n}"))
            for n, (token, projects) in enumerate(scopes.items(), start=1)
        ]

    def authenticate(self, presented: str | None) -> Principal:
        if not presented:
            raise self._unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        candidate = presented.encode("utf-8")
        found: Principal | None = None
        # Compare against every token, without stopping at a match, so the time taken does
        # not tell which entry (or whether an early one) matched.
        for token, principal in self._entries:
            if hmac.compare_digest(candidate, token) and found is None:
                found = principal
        if found is None:
            raise self._unauthorized("invalid bearer token", error="invalid_token")
        return found

    def require_project(self, principal: Principal, project_id: int) -> None:
        """404 for a project outside the token's scope: the same answer as a missing one."""
        if not principal.may_see(project_id):
            logger.info("%s may not see project %s; answering 404", principal.label, project_id)
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"project {project_id} not found")

    @staticmethod
    def _unauthorized(detail: str, *, error: str | None = None) -> HTTPException:
        logger.info("Rejected a request: %s", detail)
        challenge = BEARER_CHALLENGE if error is None else f'{BEARER_CHALLENGE} error="{error}"'
        return HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge}
        )
