"""Users and API keys. Keys are shown once, stored as SHA-256 digests."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from memcube.atomic import write_atomic
from memcube.errors import Unauthorized
from memos.db.engine import Database
from memos.db.models import ApiKey, User
from memos.db.types import utcnow
from memos.services.ids import decode_cursor, encode_cursor, new_id
from memos.services.views import Page, Principal, UserSummary, UserView

ADMIN_USER_ID = "usr_admin"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return "msk_" + secrets.token_urlsafe(32)


def _file_key(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


class AuthService:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create_user(self, name: str, is_admin: bool = False) -> UserView:
        key = generate_key()
        with self.db.write() as s:
            user = User(id=new_id("usr"), name=name, is_admin=is_admin)
            s.add(user)
            s.flush()
            s.add(ApiKey(user_id=user.id, key_hash=hash_key(key), prefix=key[:8], name="initial"))
        return UserView(id=user.id, name=user.name, api_key=key)

    def users(self, limit: int, cursor: str | None) -> Page[UserSummary]:
        """Every user, oldest first (for the admin)."""
        start = decode_cursor(cursor) or 0
        with self.db.read() as s:
            rows = s.scalars(
                select(User).order_by(User.created_at, User.id).offset(start).limit(limit + 1)
            ).all()
        items = [UserSummary(u.id, u.name, bool(u.is_admin), u.created_at) for u in rows[:limit]]
        more = len(rows) > limit
        return Page(items=items, next_cursor=encode_cursor(start + limit) if more else None)

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <api-key>'")
        with self.db.read() as s:
            row = s.execute(
                select(User.id, User.is_admin)
                .join(ApiKey, ApiKey.user_id == User.id)
                .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
            ).first()
        if row is None:
            raise Unauthorized("unknown or revoked API key")
        return Principal(user_id=row.id, is_admin=bool(row.is_admin))

    def ensure_admin(self, configured_key: str | None, key_file: Path) -> str | None:
        """Make sure the admin can log in. Returns the key file's path if a key was generated.

        With a configured key (MEMOS_ADMIN_KEY) that key becomes the admin's only key, and a
        `key_file` holding another key (one generated before) is removed: it holds a revoked
        key, which tools such as the CLI would otherwise keep sending. Without one, the key in
        `key_file` is kept if it is valid; otherwise a new key is generated, written there
        (mode 0600) and older admin keys are revoked, except on PostgreSQL: there the older
        keys may be other daemons' of one fleet (each generated its own), which must keep
        working, so the new key is added beside them (a fleet should set MEMOS_ADMIN_KEY).
        """
        with self.db.write() as s:
            if self.db.dialect == "postgresql":
                # Daemons of a fleet starting together: one at a time (the first creates the
                # admin; the others find it), released at commit.
                s.execute(text("SELECT pg_advisory_xact_lock(726354)"))
            if s.get(User, ADMIN_USER_ID) is None:
                s.add(User(id=ADMIN_USER_ID, name="admin", is_admin=True))
                s.flush()
            key = configured_key
            generated = False
            if key is None and key_file.exists():
                candidate = _file_key(key_file)
                if candidate and self._admin_key_active(s, candidate):
                    return None
            if key is None:
                key = generate_key()
                generated = True
            digest = hash_key(key)
            if not (generated and self.db.dialect == "postgresql"):
                s.execute(
                    update(ApiKey)
                    .where(
                        ApiKey.user_id == ADMIN_USER_ID,
                        ApiKey.key_hash != digest,
                        ApiKey.revoked_at.is_(None),
                    )
                    .values(revoked_at=utcnow())
                )
            if not self._admin_key_active(s, key):
                s.add(ApiKey(user_id=ADMIN_USER_ID, key_hash=digest, prefix=key[:8], name="admin"))
        if not generated and key_file.exists() and _file_key(key_file) != key:
            key_file.unlink(missing_ok=True)
        if generated:
            write_atomic(key_file, (key + "\n").encode(), mode=0o600)
            return str(key_file)
        return None

    @staticmethod
    def _admin_key_active(s: Session, key: str) -> bool:
        return (
            s.scalar(
                select(ApiKey.id).where(
                    ApiKey.user_id == ADMIN_USER_ID,
                    ApiKey.key_hash == hash_key(key),
                    ApiKey.revoked_at.is_(None),
                )
            )
            is not None
        )
