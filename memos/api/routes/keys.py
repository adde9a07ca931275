"""The caller's own API keys: list (no secrets), create (the secret shown once), revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response

from memos.api.deps import DaemonDep, PrincipalDep
from memos.api.schemas_access import KeyCreate, KeyCreated, KeyList, KeyOut

router = APIRouter(prefix="/v1/keys", tags=["keys"])

Limit = Annotated[int, Query(ge=1, le=500)]


@router.get("", response_model=KeyList)
def list_keys(
    daemon: DaemonDep, principal: PrincipalDep, limit: Limit = 50, cursor: str | None = None
) -> KeyList:
    page = daemon.keys.page(principal, limit, cursor)
    return KeyList(
        items=[KeyOut.model_validate(k) for k in page.items], next_cursor=page.next_cursor
    )


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(
    daemon: DaemonDep,
    principal: PrincipalDep,
    body: Annotated[KeyCreate | None, Body()] = None,
) -> KeyCreated:
    """A new key for the caller; its secret (`api_key`) is in this response and nowhere else.
    At most `quotas.max_keys_per_user` active keys (429 `quota_exceeded`)."""
    view = daemon.keys.create(principal, (body or KeyCreate()).name)
    return KeyCreated.model_validate(view)


@router.delete("/{key_id}", status_code=204)
def revoke_key(key_id: str, daemon: DaemonDep, principal: PrincipalDep) -> Response:
    """Revoke one of the caller's keys: it gets 401 from the next request on. Another user's
    key is 404; the caller's last active key is 409 `last_key` (create a new one first)."""
    daemon.keys.revoke(principal, key_id)
    return Response(status_code=204)
