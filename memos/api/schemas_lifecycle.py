"""Bodies of the lifecycle routes: a cube's policy (`/v1/cubes/{cube_id}/policy`)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field, StrictBool

from memos.api.schemas import Out, Strict
from memos.services.lifecycle import PolicyView


class FuseUpdate(Strict):
    enabled: StrictBool | None = None
    threshold: float | None = None


class PolicyUpdate(Strict):
    """The fields to change; omitted ones keep their value. Ranges are checked by the service
    (422 `invalid_policy` naming every problem)."""

    activation_bytes_max: int | None = Field(None, description="null: only the daemon's budget")
    memory_ttl_days: float | None = Field(None, description="null: notes never expire")
    deleted_retention_days: float | None = None
    hot_recalls: int | None = None
    demote_after_days: float | None = None
    fuse: FuseUpdate | None = None
    eviction: str | None = Field(None, description="lru, lfu or gdsf")

    def changes(self) -> dict[str, object]:
        """The fields the body named (a null only where the field may be null)."""
        return self.model_dump(exclude_unset=True)


class FuseOut(BaseModel):
    enabled: bool
    threshold: float


class PolicyOut(BaseModel):
    cube_id: str
    activation_bytes_max: int | None
    memory_ttl_days: float | None
    deleted_retention_days: float
    hot_recalls: int
    demote_after_days: float
    fuse: FuseOut
    eviction: str
    overrides: list[str] = Field(description="fields the owner set; the rest are defaults")
    version: int = Field(description="0: never set, the daemon's defaults")
    changed_at: datetime | None
    changed_by: str | None

    @classmethod
    def of(cls, view: PolicyView) -> PolicyOut:
        return cls(
            cube_id=view.cube_id,
            **view.policy.model_dump(),
            overrides=list(view.overrides),
            version=view.version,
            changed_at=view.changed_at,
            changed_by=view.changed_by,
        )


class PolicyHistory(Out):
    items: list[PolicyOut]
