from __future__ import annotations

from fastapi import APIRouter

from memos.api.deps import AdminDep, DaemonDep
from memos.api.schemas import UserCreate, UserOut

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.post("", status_code=201, response_model=UserOut)
def create_user(body: UserCreate, daemon: DaemonDep, _: AdminDep) -> UserOut:
    """Create a user; its API key is in this response and nowhere else, ever."""
    return UserOut.model_validate(daemon.auth.create_user(body.name))
