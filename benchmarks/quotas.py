"""What the memory quota costs an add: the owner's live-memory count inside the write transaction.

With `quotas.max_memories_per_user` set, every add locks the owner's user row and sums the
live-memory counters of the owner's cubes (`cubes.live_memories`, kept by every write). This
measures that check: the median of `--runs` write transactions that bump the cube's generation
(as every add does, so each commits a write) with and without it, at several sizes, on SQLite
and on PostgreSQL (skipped when `--postgres` is not reachable). `row count` is the same without
the counters: the owner's live rows counted, as the check was first written.

    python benchmarks/quotas.py --json docs/quotas.json
    python benchmarks/quotas.py --sizes 1000 --runs 20          # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, insert, select, update  # noqa: E402

from benchmarks.report import print_table  # noqa: E402
from memos.db.engine import Database  # noqa: E402
from memos.db.migrate import upgrade  # noqa: E402
from memos.db.models import Cube, Memory, User  # noqa: E402
from memos.db.types import utcnow  # noqa: E402
from memos.services.quotas import QuotaService  # noqa: E402
from memos.services.repository import bump_generation  # noqa: E402
from memos.settings import QuotasConfig  # noqa: E402

CUBES = 4  # the owner's memories are spread over this many cubes


def fill(db: Database, owner: str, size: int) -> str:
    """An owner with `size` live memories (and 10% soft-deleted ones) over CUBES cubes."""
    now = utcnow()
    with db.write() as s:
        s.add(User(id=owner, name=owner))
        s.flush()
        cubes = [f"cube_{owner}_{i}" for i in range(CUBES)]
        s.add_all(Cube(id=c, name=c, owner_id=owner, generation=0) for c in cubes)
    rows = [
        {
            "id": f"mem_{uuid.uuid4().hex[:20]}",
            "cube_id": cubes[i % CUBES],
            "content": f"note {i}",
            "timestamp": now,
            "metadata_": {},
            "keywords": [],
            "tags": [],
            "context": "",
            "embedding": b"\0" * 16,
            "version": 1,
            "change_seq": 1,
            "created_at": now,
            "updated_at": now,
            "deleted_at": now if i % 10 == 9 else None,
            "enrichment": "done",
        }
        for i in range(size + size // 9)
    ]
    for start in range(0, len(rows), 10_000):
        with db.write() as s:
            s.execute(insert(Memory), rows[start : start + 10_000])
    with db.write() as s:  # the counters the daemon's writes keep, as migration 0006 fills them
        for cube_id in cubes:
            live = select(func.count(Memory.seq)).where(
                Memory.cube_id == cube_id, Memory.deleted_at.is_(None)
            )
            s.execute(
                update(Cube).where(Cube.id == cube_id).values(live_memories=live.scalar_subquery())
            )
    return cubes[0]


def count_rows(s: Any, cube_id: str) -> int:
    """The check as first written: the owner's live rows counted (O(memories)), for comparison."""
    owner = select(Cube.owner_id).where(Cube.id == cube_id).scalar_subquery()
    return int(
        s.scalar(
            select(func.count(Memory.seq))
            .join(Cube, Cube.id == Memory.cube_id)
            .where(Cube.owner_id == owner, Memory.deleted_at.is_(None))
        )
    )


def median_ms(db: Database, run: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        with db.write() as s:
            run(s)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(db: Database, backend: str, sizes: list[int], runs: int) -> list[dict[str, Any]]:
    upgrade(db)
    quotas = QuotaService(db, QuotasConfig(max_memories_per_user=10**12))
    rows = []
    for size in sizes:
        cube_id = fill(db, f"usr_{uuid.uuid4().hex[:10]}", size)
        bare = median_ms(db, lambda s, c=cube_id: bump_generation(s, c), runs)
        checked = median_ms(
            db, lambda s, c=cube_id: (quotas.check_memories(s, c, 1), bump_generation(s, c)), runs
        )
        counted = median_ms(
            db, lambda s, c=cube_id: (count_rows(s, c), bump_generation(s, c)), runs
        )
        rows.append(
            {
                "backend": backend,
                "live_memories": size,
                "bump_tx_ms": round(bare, 3),
                "with_check_ms": round(checked, 3),
                "check_ms": round(checked - bare, 3),
                "row_count_ms": round(counted - bare, 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{tmp}/quotas.db")
        rows += measure(db, "sqlite", args.sizes, args.runs)
        db.dispose()
    try:
        import psycopg

        admin = args.postgres.replace("postgresql+psycopg://", "postgresql://")
        name = f"memos_quota_bench_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # no PostgreSQL here: report SQLite alone
        print(f"postgres skipped: {exc}")
    else:
        db = Database(args.postgres.rsplit("/", 1)[0] + f"/{name}")
        try:
            rows += measure(db, "postgres", args.sizes, args.runs)
        finally:
            db.dispose()
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print_table(
        f"memory quota check inside a write transaction (median of {args.runs})",
        [
            ("backend", "backend", ">8"),
            ("live", "live_memories", ">8d"),
            ("bump tx ms", "bump_tx_ms", ">8.3f"),
            ("+check ms", "with_check_ms", ">8.3f"),
            ("check ms", "check_ms", ">8.3f"),
            ("row count ms", "row_count_ms", ">8.3f"),
        ],
        rows,
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
