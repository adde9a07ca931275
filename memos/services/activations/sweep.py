"""The orphan sweep: activation files without a row (or of a failed build) are removed, rows
without files are failed.

Run at start and by the index-maintenance job. What it reads is taken in the order that makes
it safe against builds and deletions running meanwhile: the folders on disk first, then the
rows, then the builds in flight (the build queue's, and the builds requests run themselves:
`Catalogue.building_inline`). A build inserts its row before writing files and a deletion
removes the row before the files, so a folder listed before the rows were read and without a
row is a leftover; a "building" row read before the in-flight set was taken and not in it has
no build left to finish it (failing it is conditional on its state then, so a build that just
ended is left alone), provided its builder is gone too: on a database shared by several
daemons, another live daemon's build is in no set of this one's.

A ready row without files here is failed only when the blob store says they are gone for good
(`BlobStore.gone`: no other daemon of the fleet alive, and none in the shared tier); else
another daemon may still hold them, and a load answers 503 activation_unavailable meanwhile.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select, update

from memos.db.engine import Database
from memos.db.models import Activation, Cube
from memos.services.activations.builds import BuildQueue
from memos.services.activations.catalogue import Catalogue, interrupted

MISSING = "its files are missing; build it again"


@dataclass(frozen=True)
class SweepReport:
    removed: int  # activation folders with no row or a failed one, removed
    failed: int  # building rows with no build, ready rows with no files: failed
    cubes: int  # folders of deleted cubes, removed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ActivationSweep:
    def __init__(self, db: Database, catalogue: Catalogue, builds: BuildQueue) -> None:
        self.db = db
        self.catalogue = catalogue
        self.builds = builds

    def run(self) -> SweepReport:
        root = self.catalogue.directory
        folders = [
            (cube.name, act.name)
            for cube in (sorted(root.iterdir()) if root.is_dir() else [])
            if cube.is_dir()
            for act in sorted(cube.iterdir())
            if act.is_dir()
        ]
        cube_dirs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        with self.db.read() as s:
            rows = {a.id: (a.cube_id, a.state) for a in s.execute(
                select(Activation.id, Activation.cube_id, Activation.state)
            )}  # fmt: skip
            owners = {  # "building" rows whose builder is gone: their builder, by id
                activation_id: owner
                for activation_id, owner in s.execute(
                    select(Activation.id, Activation.instance_id).where(
                        Activation.state == "building", self.catalogue.gone()
                    )
                )
            }
            cubes = set(s.scalars(select(Cube.id)))
        building = self.builds.building() | self.catalogue.building_here()
        removed = 0
        for cube_id, activation_id in folders:
            row = rows.get(activation_id)
            leftover = row is None or row[0] != cube_id or row[1] == "failed"
            if leftover and activation_id not in building:
                self.catalogue.remove_files(cube_id, activation_id)
                removed += 1
        gone = 0
        for cube_id in cube_dirs:
            if cube_id not in cubes:
                shutil.rmtree(root / cube_id, ignore_errors=True)
                gone += 1
        failed = 0
        for activation_id, (cube_id, state) in rows.items():
            if state == "building" and activation_id not in building:
                if activation_id not in owners:
                    continue  # another daemon builds it
                # No build will finish it; what it wrote is incomplete.
                error = interrupted(owners[activation_id], self.catalogue.instance_id)
            elif (
                state == "ready"
                and activation_id not in building
                and self.catalogue.blobs.gone(cube_id, activation_id)
            ):
                error = MISSING  # not here, no other daemon alive, not in the shared tier
            else:
                continue
            with self.db.write() as s:
                where = [Activation.id == activation_id, Activation.state == state]
                if state == "building":
                    where.append(self.catalogue.gone())
                failing = update(Activation).where(*where)
                result = s.execute(failing.values(state="failed", error=error))
            if result.rowcount:  # type: ignore[attr-defined]
                failed += 1
                if state == "building":
                    self.catalogue.remove_files(cube_id, activation_id)
        return SweepReport(removed=removed, failed=failed, cubes=gone)
