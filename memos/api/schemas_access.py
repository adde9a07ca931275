"""Bodies of the access routes beyond the contract's floor: API keys, the user list, grants."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from memos.api.schemas import Out, Strict, Text


class KeyCreate(Strict):
    name: Text = Field("", max_length=200, description="a label to tell keys apart")


class KeyOut(Out):
    id: str
    name: str
    prefix: str = Field(description="the key's first 8 characters, to recognise it")
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(Out):
    id: str
    name: str
    prefix: str
    created_at: datetime
    api_key: str = Field(description="the secret: shown in this response only, never again")


class KeyList(BaseModel):
    items: list[KeyOut]
    next_cursor: str | None = None


class UserSummaryOut(Out):
    id: str
    name: str
    is_admin: bool
    created_at: datetime


class UserList(BaseModel):
    items: list[UserSummaryOut]
    next_cursor: str | None = None


class GrantEntry(Out):
    cube_id: str
    user_id: str
    role: str
    created_at: datetime


class GrantList(BaseModel):
    items: list[GrantEntry]
    next_cursor: str | None = None
