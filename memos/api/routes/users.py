from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from memos.api.deps import AdminDep, DaemonDep
from memos.api.schemas import UserCreate, UserOut
from memos.api.schemas_access import UserList, UserSummaryOut

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.post("", status_code=201, response_model=UserOut)
def create_user(body: UserCreate, daemon: DaemonDep, _: AdminDep) -> UserOut:
    """Create a user; its API key is in this response and nowhere else, ever."""
    return UserOut.model_validate(daemon.auth.create_user(body.name))


@router.get("", response_model=UserList)
def list_users(
    daemon: DaemonDep,
    _: AdminDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> UserList:
    """Every user, oldest first (admin only); no keys."""
    page = daemon.auth.users(limit, cursor)
    return UserList(
        items=[UserSummaryOut.model_validate(u) for u in page.items],
        next_cursor=page.next_cursor,
    )
