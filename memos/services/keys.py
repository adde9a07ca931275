"""A user's own API keys: list, create, revoke. Secrets are shown once, at creation.

Key ids are `key_<n>`; a key that is not the caller's answers 404, like one that does not exist.
Revocation takes effect on the next request (every request reads the key's row). A user may not
revoke their last active key (409 `last_key`): no route can give an existing user a key again,
so that request would lock them out for good; create the new key first, then revoke the old.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from memcube.errors import Conflict, NotFound
from memos.db.engine import Database
from memos.db.models import ApiKey
from memos.db.types import utcnow
from memos.services.auth import generate_key, hash_key
from memos.services.ids import decode_cursor, encode_cursor
from memos.services.quotas import QuotaService
from memos.services.views import KeyView, Page, Principal

KEY_PREFIX = "key_"


def public_key_id(row_id: int) -> str:
    return f"{KEY_PREFIX}{row_id}"


def _row_id(key_id: str) -> int | None:
    digits = key_id.removeprefix(KEY_PREFIX)
    if key_id == digits or not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        return None
    return int(digits)


def _view(row: ApiKey, secret: str | None = None) -> KeyView:
    return KeyView(
        id=public_key_id(row.id),
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        api_key=secret,
    )


def key_not_found(key_id: str) -> NotFound:
    return NotFound(f"API key {key_id!r} not found", code="key_not_found")


class KeyService:
    def __init__(self, db: Database, quotas: QuotaService) -> None:
        self.db = db
        self.quotas = quotas

    def page(self, principal: Principal, limit: int, cursor: str | None) -> Page[KeyView]:
        """The caller's keys, revoked ones included, oldest first."""
        after = decode_cursor(cursor)
        query = select(ApiKey).where(ApiKey.user_id == principal.user_id)
        if after is not None:
            query = query.where(ApiKey.id > after)
        with self.db.read() as s:
            rows = list(s.scalars(query.order_by(ApiKey.id).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].id) if more and rows else None
        return Page(items=[_view(r) for r in rows], next_cursor=next_cursor)

    def create(self, principal: Principal, name: str) -> KeyView:
        secret = generate_key()
        with self.db.write() as s:
            self.quotas.check_keys(s, principal.user_id)
            row = ApiKey(
                user_id=principal.user_id,
                key_hash=hash_key(secret),
                prefix=secret[:8],
                name=name,
                created_at=utcnow(),
            )
            s.add(row)
            s.flush()
            return _view(row, secret)

    def revoke(self, principal: Principal, key_id: str) -> None:
        """Revoke one of the caller's keys; revoking a revoked key again changes nothing."""
        row_id = _row_id(key_id)
        if row_id is None:
            raise key_not_found(key_id)
        with self.db.write() as s:
            self.quotas.lock_user(s, principal.user_id)  # two revocations cannot both pass
            row = s.get(ApiKey, row_id)
            if row is None or row.user_id != principal.user_id:
                raise key_not_found(key_id)
            if row.revoked_at is not None:
                return
            if self._active(s, principal.user_id) <= 1:
                raise Conflict(
                    f"{key_id!r} is your last active API key; create another one first",
                    code="last_key",
                )
            row.revoked_at = utcnow()

    @staticmethod
    def _active(s: Session, user_id: str) -> int:
        count = s.scalar(
            select(func.count(ApiKey.id)).where(
                ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None)
            )
        )
        return int(count or 0)
