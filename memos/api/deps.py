"""Request-scoped dependencies: the daemon and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from memcube.errors import Forbidden
from memos.daemon import Daemon
from memos.services.auth import hash_key
from memos.services.views import Principal

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")


async def get_daemon(request: Request) -> Daemon:
    """Async on purpose: FastAPI runs a plain `def` dependency on the thread pool, one more
    thread hand-off per request (each a wait for the interpreter while enrichment runs)."""
    daemon: Daemon = request.app.state.daemon
    return daemon


DaemonDep = Annotated[Daemon, Depends(get_daemon)]


def get_principal(
    daemon: DaemonDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, once its key is known and within its rate limit (429 `rate_limited`).

    Every /v1 route depends on this; /healthz and /metrics do not, so they are never limited.
    Unknown keys get 401 before any bucket is made for them.
    """
    key = credentials.credentials if credentials else None
    principal = daemon.auth.authenticate(key)
    if key is not None and daemon.rate_limiter.enabled:
        daemon.rate_limiter.check(hash_key(key))
    return principal


def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route is for the admin key only")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]
