"""Per-cube lifecycle policies: what the owner set over the daemon's defaults, with history.

A cube without a policy row follows `Settings.lifecycle` (`LifecycleConfig`). A `PUT` stores
the fields its owner has set so far (merged with the ones set before; `fuse` merged key by
key) as a new version in `cube_policies`, so every change stays readable as history. The
policy in force is the defaults overlaid with the newest version's fields: a default the
operator changes later still applies to every field no owner set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from memcube.errors import InvalidArgument
from memos.db.engine import Database
from memos.db.models import Cube, CubePolicy
from memos.db.types import utcnow
from memos.services.cubes import CubeService
from memos.services.views import Principal, Role
from memos.settings import LifecycleConfig, LifecyclePolicy

log = logging.getLogger("memos.lifecycle")

FIELDS = tuple(LifecyclePolicy.model_fields)


@dataclass(frozen=True)
class PolicyView:
    cube_id: str
    policy: LifecyclePolicy  # in force
    overrides: tuple[str, ...]  # fields the owner set; the others are the daemon's defaults
    version: int  # 0: never set
    changed_at: datetime | None
    changed_by: str | None


def _invalid(exc: ValidationError) -> InvalidArgument:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "policy"
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message} (got {error.get('input')!r})")
    return InvalidArgument("invalid policy: " + "; ".join(problems), code="invalid_policy")


class PolicyService:
    def __init__(self, db: Database, cubes: CubeService, defaults: LifecycleConfig) -> None:
        self.db = db
        self.cubes = cubes
        self.defaults = LifecyclePolicy.model_validate(defaults.model_dump(include=set(FIELDS)))

    # -- for users --------------------------------------------------------------------------

    def get(self, principal: Principal, cube_id: str) -> PolicyView:
        self.cubes.require(principal, cube_id, Role.READER)
        with self.db.read() as s:
            return self._view(cube_id, _latest(s, cube_id))

    def history(self, principal: Principal, cube_id: str) -> list[PolicyView]:
        """Every version the owner set, oldest first."""
        self.cubes.require(principal, cube_id, Role.READER)
        with self.db.read() as s:
            rows = s.scalars(
                select(CubePolicy).where(CubePolicy.cube_id == cube_id).order_by(CubePolicy.version)
            ).all()
            return [self._view(cube_id, row) for row in rows]

    def set(self, principal: Principal, cube_id: str, changes: dict[str, Any]) -> PolicyView:
        """Owner only. `changes`: the fields to set (others keep their value); an unknown field
        or a value out of range is refused with every problem named, and nothing changes."""
        self.cubes.require(principal, cube_id, Role.OWNER)
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise InvalidArgument(
                f"unknown policy fields {unknown}; the fields are {list(FIELDS)}",
                code="invalid_policy",
            )
        with self.db.write() as s:
            # The cube's row, locked, serialises the cube's policy changes (on PostgreSQL; a
            # SQLite write transaction is alone anyway): two first changes would otherwise both
            # read no version and both insert version 1.
            s.execute(select(Cube.id).where(Cube.id == cube_id).with_for_update())
            latest = _latest(s, cube_id)
            overrides = dict(latest.policy) if latest is not None else {}
            for name, value in changes.items():
                if name == "fuse" and isinstance(value, dict):
                    value = {**(overrides.get("fuse") or {}), **value}
                overrides[name] = value
            self._effective(overrides)  # validates; raises before anything is written
            version = (latest.version if latest is not None else 0) + 1
            row = CubePolicy(
                cube_id=cube_id,
                version=version,
                policy=overrides,
                changed_by=principal.user_id,
                changed_at=utcnow(),
            )
            s.add(row)
            view = self._view(cube_id, row)
        fields = {"cube_id": cube_id, "version": version, "changed": sorted(changes)}
        log.info("cube policy changed", extra={"fields": fields})
        return view

    # -- for the jobs (the system path: no principal) ---------------------------------------

    def in_force(self) -> dict[str, LifecyclePolicy]:
        """Every cube's policy in force, by cube id."""
        with self.db.read() as s:
            cube_ids = list(s.scalars(select(Cube.id).order_by(Cube.id)))
            newest = (
                select(CubePolicy.cube_id, func.max(CubePolicy.version).label("version"))
                .group_by(CubePolicy.cube_id)
                .subquery()
            )
            rows = s.scalars(
                select(CubePolicy).join(
                    newest,
                    (CubePolicy.cube_id == newest.c.cube_id)
                    & (CubePolicy.version == newest.c.version),
                )
            ).all()
            overrides = {row.cube_id: dict(row.policy) for row in rows}
        return {cube_id: self._effective(overrides.get(cube_id, {})) for cube_id in cube_ids}

    # -- helpers ----------------------------------------------------------------------------

    def _effective(self, overrides: dict[str, Any]) -> LifecyclePolicy:
        merged = self.defaults.model_dump()
        for name, value in overrides.items():
            if name == "fuse" and isinstance(value, dict):
                value = {**merged["fuse"], **value}
            merged[name] = value
        try:
            return LifecyclePolicy.model_validate(merged)
        except ValidationError as exc:
            raise _invalid(exc) from None

    def _view(self, cube_id: str, row: CubePolicy | None) -> PolicyView:
        overrides = dict(row.policy) if row is not None else {}
        return PolicyView(
            cube_id=cube_id,
            policy=self._effective(overrides),
            overrides=tuple(name for name in FIELDS if name in overrides),
            version=row.version if row is not None else 0,
            changed_at=row.changed_at if row is not None else None,
            changed_by=row.changed_by if row is not None else None,
        )


def _latest(s: Session, cube_id: str) -> CubePolicy | None:
    query = (
        select(CubePolicy)
        .where(CubePolicy.cube_id == cube_id)
        .order_by(CubePolicy.version.desc())
        .limit(1)
    )
    return s.scalar(query)
