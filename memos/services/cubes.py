"""Cubes, grants and the access check every cube-scoped route goes through."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import LargeBinary, cast, delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from memcube.errors import Conflict, Forbidden, InvalidArgument, NotFound
from memos.db.engine import Database
from memos.db.models import Activation, Cube, Grant, Memory, User
from memos.db.types import utcnow
from memos.services.ids import decode_cursor, encode_cursor, new_id
from memos.services.quotas import QuotaService
from memos.services.views import CubeStats, CubeView, GrantView, Page, Principal, Role

GRANTABLE = {"reader": Role.READER, "writer": Role.WRITER}


def cube_not_found(cube_id: str) -> NotFound:
    return NotFound(f"cube {cube_id!r} not found", code="cube_not_found")


def _view(cube: Cube, role: Role, stats: CubeStats | None = None) -> CubeView:
    return CubeView(
        id=cube.id,
        name=cube.name,
        description=cube.description,
        owner_id=cube.owner_id,
        created_at=cube.created_at,
        role=role.name.lower(),
        stats=stats,
    )


class CubeService:
    def __init__(
        self,
        db: Database,
        on_delete: Callable[[str], None],
        index_bytes: Callable[[str], int],
        quotas: QuotaService | None = None,
    ) -> None:
        self.db = db
        self._on_delete = on_delete
        self._index_bytes = index_bytes
        self.quotas = quotas

    # -- access -----------------------------------------------------------------------------

    def role_of(self, s: Session, principal: Principal, cube_id: str) -> tuple[Cube, Role]:
        """The caller's role on the cube; 404 if the caller may not see it at all."""
        cube = s.get(Cube, cube_id)
        if cube is None:
            raise cube_not_found(cube_id)
        if cube.owner_id == principal.user_id:
            return cube, Role.OWNER
        grant = s.get(Grant, (cube_id, principal.user_id))
        if grant is None:
            raise cube_not_found(cube_id)  # never reveal that the cube exists
        return cube, GRANTABLE[grant.role]

    def require(self, principal: Principal, cube_id: str, need: Role) -> CubeView:
        with self.db.read() as s:
            cube, role = self.role_of(s, principal, cube_id)
        if role < need:
            raise Forbidden(
                f"your role on cube {cube_id!r} is {role.name.lower()}; "
                f"this needs {need.name.lower()}",
                code="forbidden",
            )
        return _view(cube, role)

    # -- commands ---------------------------------------------------------------------------

    def create(self, principal: Principal, name: str, description: str) -> CubeView:
        try:
            with self.db.write() as s:
                if self.quotas is not None:
                    self.quotas.check_cubes(s, principal.user_id)
                cube = Cube(
                    id=new_id("cube"),
                    name=name,
                    description=description,
                    owner_id=principal.user_id,
                    generation=0,
                )
                s.add(cube)
        except IntegrityError:
            if not self._name_taken(principal.user_id, name):
                raise  # not a duplicate name: a broken invariant, not the caller's mistake
            raise Conflict(f"you already have a cube named {name!r}", code="cube_exists") from None
        return _view(cube, Role.OWNER)

    def _name_taken(self, owner_id: str, name: str) -> bool:
        with self.db.read() as s:
            found = s.scalar(select(Cube.id).where(Cube.owner_id == owner_id, Cube.name == name))
        return found is not None

    def visible(self, principal: Principal, limit: int, cursor: str | None) -> Page[CubeView]:
        after = decode_cursor(cursor)
        with self.db.read() as s:
            granted = select(Grant.cube_id).where(Grant.user_id == principal.user_id)
            query = (
                select(Cube, Grant.role)
                .outerjoin(Grant, (Grant.cube_id == Cube.id) & (Grant.user_id == principal.user_id))
                .where(or_(Cube.owner_id == principal.user_id, Cube.id.in_(granted)))
                .order_by(Cube.created_at, Cube.id)
            )
            rows = s.execute(query).all()
        # Cubes per user are few; paging by position over a stable order keeps cursors simple.
        start = after or 0
        page = rows[start : start + limit]
        items = [
            _view(cube, Role.OWNER if cube.owner_id == principal.user_id else GRANTABLE[role])
            for cube, role in page
        ]
        more = start + limit < len(rows)
        return Page(items=items, next_cursor=encode_cursor(start + limit) if more else None)

    def get(self, principal: Principal, cube_id: str) -> CubeView:
        with self.db.read() as s:
            cube, role = self.role_of(s, principal, cube_id)
            content_bytes = (
                func.length(cast(Memory.content, LargeBinary))
                if self.db.dialect == "sqlite"
                else func.octet_length(Memory.content)
            )
            count, pending, text_bytes, vector_bytes = s.execute(
                select(
                    func.count(Memory.seq),
                    func.count(Memory.seq).filter(Memory.enrichment == "pending"),
                    func.coalesce(func.sum(content_bytes), 0),
                    func.coalesce(func.sum(func.length(Memory.embedding)), 0),
                ).where(Memory.cube_id == cube_id, Memory.deleted_at.is_(None))
            ).one()
            activations = s.scalar(
                select(func.count(Activation.id)).where(Activation.cube_id == cube_id)
            )
        stats = CubeStats(
            memories=int(count),
            activations=int(activations or 0),
            bytes=int(text_bytes) + int(vector_bytes) + self._index_bytes(cube_id),
            enrichment_pending=int(pending),
        )
        return _view(cube, role, stats)

    def delete(self, principal: Principal, cube_id: str) -> None:
        with self.db.write() as s:
            cube, role = self.role_of(s, principal, cube_id)
            if role < Role.OWNER:
                raise Forbidden(f"only the owner may delete cube {cube_id!r}")
            s.execute(delete(Cube).where(Cube.id == cube_id))
        self._on_delete(cube_id)

    def grant(self, principal: Principal, cube_id: str, user_id: str, role: str) -> dict[str, str]:
        if role not in GRANTABLE:
            raise InvalidArgument(f"role {role!r} is not one of {sorted(GRANTABLE)}")
        with self.db.write() as s:
            cube, own_role = self.role_of(s, principal, cube_id)
            if own_role < Role.OWNER:
                raise Forbidden(f"only the owner may grant access to cube {cube_id!r}")
            if s.get(User, user_id) is None:
                raise NotFound(f"user {user_id!r} not found", code="user_not_found")
            if user_id == cube.owner_id:
                raise InvalidArgument(f"user {user_id!r} owns cube {cube_id!r} already")
            # One statement, so two concurrent grants of the same user cannot both insert.
            insert = pg_insert if self.db.dialect == "postgresql" else sqlite_insert
            upsert = insert(Grant).values(
                cube_id=cube_id, user_id=user_id, role=role, created_at=utcnow()
            )
            s.execute(
                upsert.on_conflict_do_update(
                    index_elements=[Grant.cube_id, Grant.user_id], set_={"role": role}
                )
            )
        return {"cube_id": cube_id, "user_id": user_id, "role": role}

    def _owned(self, s: Session, principal: Principal, cube_id: str, doing: str) -> Cube:
        cube, role = self.role_of(s, principal, cube_id)
        if role < Role.OWNER:
            raise Forbidden(f"only the owner may {doing} cube {cube_id!r}")
        return cube

    def grants(
        self, principal: Principal, cube_id: str, limit: int, cursor: str | None
    ) -> Page[GrantView]:
        """The cube's grants, oldest first (owner only)."""
        start = decode_cursor(cursor) or 0
        with self.db.read() as s:
            self._owned(s, principal, cube_id, "list the grants of")
            rows = s.scalars(
                select(Grant)
                .where(Grant.cube_id == cube_id)
                .order_by(Grant.created_at, Grant.user_id)
                .offset(start)
                .limit(limit + 1)
            ).all()
        items = [GrantView(g.cube_id, g.user_id, g.role, g.created_at) for g in rows[:limit]]
        more = len(rows) > limit
        return Page(items=items, next_cursor=encode_cursor(start + limit) if more else None)

    def revoke(self, principal: Principal, cube_id: str, user_id: str) -> None:
        """Remove a user's grant (owner only). Access checks read grants on every request,
        so the user's next request on the cube already gets 404."""
        with self.db.write() as s:
            self._owned(s, principal, cube_id, "revoke grants on")
            removed = s.execute(
                delete(Grant).where(Grant.cube_id == cube_id, Grant.user_id == user_id)
            )
            if not removed.rowcount:  # type: ignore[attr-defined]
                raise NotFound(
                    f"user {user_id!r} has no grant on cube {cube_id!r}", code="grant_not_found"
                )
