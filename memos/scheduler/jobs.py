"""The jobs memosd runs. Each is a plain function over services; the runner schedules them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import select

from memcube.errors import NotFound
from memos.db.engine import Database
from memos.db.models import Cube
from memos.services.indexes import IndexRegistry


class _Report(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


def index_maintenance(
    db: Database, indexes: IndexRegistry, sweep: Callable[[], _Report] | None = None
) -> dict[str, Any]:
    """Verify every cube's ANN index against the database; replay, rebuild and save what drifted.

    Loaded cubes are checked in memory (ids, a sample of vectors, generation); cubes not
    loaded are healed if their saved index lags the database. `sweep` (the activation
    service's) then removes activation files without rows and fails rows without files.
    """
    with db.read() as s:
        cube_ids = list(s.scalars(select(Cube.id)))
    actions: Counter[str] = Counter()
    loaded = set(indexes.loaded())
    for cube_id in cube_ids:
        if cube_id in loaded:
            try:
                actions[indexes.maintain(cube_id).action] += 1
            except NotFound:
                actions["deleted"] += 1  # deleted while the job ran
    for report in indexes.heal_all():
        actions[report.action] += 1
    result: dict[str, Any] = {"cubes": len(cube_ids), "actions": dict(actions)}
    if sweep is not None:
        result["activations"] = sweep().as_dict()
    return result
