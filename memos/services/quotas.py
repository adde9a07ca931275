"""Per-user quotas: cubes, memories, activation bytes and active API keys.

Usage is counted against the owner of the cube being written to (a writer granted someone's cube
spends the owner's quota). Checks run inside the write transaction that would pass the limit,
after locking the owner's user row, so two concurrent writes cannot both see room for one more:
on SQLite write transactions are serialised already (`BEGIN IMMEDIATE`), on PostgreSQL the row
lock (`SELECT ... FOR UPDATE`) serialises writers of one owner. With every limit at 0 nothing is
counted and nothing is locked.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from memcube.errors import NotFound, QuotaExceeded
from memos.db.engine import Database
from memos.db.models import Activation, ApiKey, Cube, User
from memos.settings import QuotasConfig


class QuotaService:
    def __init__(self, db: Database, config: QuotasConfig) -> None:
        self.db = db
        self.config = config

    # -- checks inside a caller's write transaction -----------------------------------------

    def check_cubes(self, s: Session, owner_id: str, extra: int = 1) -> None:
        limit = self.config.max_cubes_per_user
        if not limit:
            return
        self.lock_user(s, owner_id)
        used = int(s.scalar(select(func.count(Cube.id)).where(Cube.owner_id == owner_id)) or 0)
        self._refuse_beyond("max_cubes_per_user", limit, used, extra, owner_id, "cubes")

    def check_memories(self, s: Session, cube_id: str, extra: int) -> None:
        """Room for `extra` more live memories in the quota of `cube_id`'s owner."""
        limit = self.config.max_memories_per_user
        if not limit:
            return
        owner_id = self._owner(s, cube_id)
        self.lock_user(s, owner_id)
        # The per-cube counters kept by every write (`bump_generation`): O(cubes), not O(rows).
        used = s.scalar(
            select(func.coalesce(func.sum(Cube.live_memories), 0)).where(Cube.owner_id == owner_id)
        )
        self._refuse_beyond(
            "max_memories_per_user", limit, int(used or 0), extra, owner_id, "memories"
        )

    def check_keys(self, s: Session, user_id: str, extra: int = 1) -> None:
        """Active (unrevoked) API keys of the user."""
        limit = self.config.max_keys_per_user
        self.lock_user(s, user_id)
        used = s.scalar(
            select(func.count(ApiKey.id)).where(
                ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None)
            )
        )
        self._refuse_beyond(
            "max_keys_per_user", limit, int(used or 0), extra, user_id, "active API keys"
        )

    # -- a check for the activation build path ----------------------------------------------

    def check_activation_bytes(
        self, cube_id: str, extra_bytes: int, s: Session | None = None
    ) -> None:
        """Room for `extra_bytes` more stored activation bytes (every activation row of every
        cube of the owner, `bytes` as stored) in the quota of `cube_id`'s owner.

        Call it before a build starts, with the size the build will store (or an upper
        bound), and again inside the transaction that records the final size; pass that
        transaction's session as `s` so the owner's row lock is held until it commits.
        """
        limit = self.config.max_activation_bytes_per_user
        if not limit:
            return
        if s is None:
            with self.db.write() as own:
                self.check_activation_bytes(cube_id, extra_bytes, own)
            return
        owner_id = self._owner(s, cube_id)
        self.lock_user(s, owner_id)
        used = s.scalar(
            select(func.coalesce(func.sum(Activation.bytes), 0))
            .join(Cube, Cube.id == Activation.cube_id)
            .where(Cube.owner_id == owner_id)
        )
        self._refuse_beyond(
            "max_activation_bytes_per_user", limit, int(used or 0), extra_bytes, owner_id,
            "bytes of activations",
        )  # fmt: skip

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _owner(s: Session, cube_id: str) -> str:
        owner_id = s.scalar(select(Cube.owner_id).where(Cube.id == cube_id))
        if owner_id is None:
            raise NotFound(f"cube {cube_id!r} not found", code="cube_not_found")
        return str(owner_id)

    @staticmethod
    def lock_user(s: Session, user_id: str) -> None:
        """Hold the user's row until commit (PostgreSQL; SQLite writers are serial anyway)."""
        s.execute(select(User.id).where(User.id == user_id).with_for_update())

    @staticmethod
    def _refuse_beyond(
        limit_name: str, limit: int, used: int, extra: int, user_id: str, what: str
    ) -> None:
        if used + extra > limit:
            raise QuotaExceeded(
                f"user {user_id!r} has {used} {what}; {extra} more would pass the limit of "
                f"{limit} (quotas.{limit_name})",
                limit=limit_name,
            )
