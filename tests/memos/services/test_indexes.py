"""Index registry: a cube embedded in another vector space is re-embedded before use."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from sqlalchemy import select

from memcube.embedder import Embedder, EmbedderConfig
from memcube.types import SearchFilters
from memcube.vector_index import read_manifest
from memos.daemon import Daemon
from memos.db.models import Cube, Memory
from memos.services.auth import ADMIN_USER_ID
from memos.services.indexes import vector_space
from memos.services.repository import note_embedding_text
from memos.services.views import NewMemory, Principal
from memos.settings import Settings

ADMIN = Principal(ADMIN_USER_ID, True)
CONTENTS = ["Sven repaired the old bicycle", "Noor baked a lemon tart", "Olga sailed a dinghy"]


def _stored_vectors(daemon: Daemon, cube_id: str) -> np.ndarray:
    with daemon.db.read() as s:
        blobs = s.scalars(
            select(Memory.embedding).where(Memory.cube_id == cube_id).order_by(Memory.seq)
        )
        return np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs])


def test_switching_vector_space_reembeds_the_cube(tmp_path, embedder, model_cache):
    int8 = Embedder(EmbedderConfig(backend="torch-int8", cache_dir=model_cache))
    # The enrichment worker is off so that which notes are enriched is up to the test.
    settings = Settings(data_dir=tmp_path, admin_key="k" * 20, enrichment={"enabled": False})
    old = Daemon(settings, embedder=int8)
    old.start()
    cube = old.cubes.create(ADMIN, "c", "")
    now = datetime.now(UTC)
    old.memories.add(ADMIN, cube.id, [NewMemory(c, "s1", None, now, {}) for c in CONTENTS[:2]])
    assert old.enrichment.run_once() == 2  # these two get enriched vectors
    old.memories.add(ADMIN, cube.id, [NewMemory(CONTENTS[2], "s1", None, now, {})])  # raw
    with old.db.read() as s:  # the first write loaded the cube and recorded its space
        assert s.scalar(select(Cube.embedder).where(Cube.id == cube.id)) == vector_space(
            int8.fingerprint
        )
    old.stop()

    new = Daemon(settings, embedder=embedder)
    new.start()
    result = new.search.search(ADMIN, cube.id, "who fixed a bike?", 1, SearchFilters())
    assert result.hits[0].memory.content == CONTENTS[0]
    # Each note is re-embedded from the text its state calls for: enriched or raw content.
    with new.db.read() as s:
        rows = s.scalars(select(Memory).where(Memory.cube_id == cube.id).order_by(Memory.seq))
        texts = [note_embedding_text(s, row) for row in rows]
    assert texts[0] != CONTENTS[0] and texts[1].startswith(CONTENTS[0])  # the prompt first
    assert texts[2] == CONTENTS[2]
    stored = _stored_vectors(new, cube.id)
    np.testing.assert_allclose(np.einsum("ij,ij->i", stored, embedder.embed(texts)), 1.0, atol=1e-5)
    with new.db.read() as s:
        assert s.scalar(select(Cube.embedder).where(Cube.id == cube.id)) == vector_space(
            embedder.fingerprint
        )
    new.stop()


def _daemon(tmp_path, embedder, **settings) -> Daemon:
    daemon = Daemon(
        Settings(data_dir=tmp_path, admin_key="k" * 20, enrichment={"enabled": False}, **settings),
        embedder=embedder,
    )
    daemon.start()
    return daemon


def test_loaded_indexes_are_evicted_lru_under_the_budget_and_reload(tmp_path, embedder):
    daemon = _daemon(tmp_path, embedder, indexes={"max_loaded_bytes": 3 << 20})
    now = datetime.now(UTC)
    cubes = [daemon.cubes.create(ADMIN, name, "").id for name in "abc"]
    for cube_id, content in zip(cubes, CONTENTS, strict=True):
        daemon.memories.add(ADMIN, cube_id, [NewMemory(content, "s1", None, now, {})])
    a, b, c = cubes
    one = daemon.indexes.get(c).footprint().bytes
    assert one <= 3 << 20 < 2 * one  # the budget holds one of these cubes, not two
    assert daemon.indexes.loaded() == [c]
    # Each evicted cube was saved first: its graph on disk reflects its last write.
    with daemon.db.read() as s:
        generations = {
            row.id: row.generation for row in s.execute(select(Cube.id, Cube.generation))
        }
    for cube_id in (a, b):
        assert read_manifest(daemon.indexes.directory(cube_id)).generation == generations[cube_id]
    graph = daemon.indexes.directory(a) / "hnsw.bin"
    written = graph.stat().st_mtime_ns
    hits = daemon.search.search(ADMIN, a, "who fixed a bike?", 1, SearchFilters()).hits
    assert [hit.memory.content for hit in hits] == [CONTENTS[0]]
    assert daemon.indexes.loaded() == [a]  # reloaded on demand; c, least recently used, went
    assert graph.stat().st_mtime_ns == written  # loaded from its saved graph, not rebuilt
    assert daemon.indexes.loaded_bytes() == daemon.indexes.get(a).footprint().bytes
    daemon.stop()


def test_edits_and_deletes_through_the_service_keep_the_index_compact(tmp_path, embedder):
    daemon = _daemon(tmp_path, embedder, retrieval={"compact_min_dead": 8})
    now = datetime.now(UTC)
    cube_id = daemon.cubes.create(ADMIN, "c", "").id
    notes = [NewMemory(f"note {i} about {CONTENTS[i % 3]}", "s1", None, now, {}) for i in range(20)]
    views = daemon.memories.add(ADMIN, cube_id, notes)
    index = daemon.indexes.get(cube_id)
    for n in range(1, 28):  # 27 edits of one note: dead rows > max(20 live, 8) at 21, 21 + 6
        daemon.memories.update(ADMIN, cube_id, views[0].id, f"edit {n} of note 0", None)
        assert index.footprint().rows == 20 + n % 21
    for d in range(1, 13):  # deleted graph elements > max(live, 8) at the 11th delete
        daemon.memories.delete(ADMIN, cube_id, views[d].id)
    footprint = daemon.indexes.get(cube_id).footprint()
    assert (footprint.live, footprint.ann_elements, footprint.ann_deleted) == (8, 9, 1)
    # Rows: 6 dead edits were left, so 6 + d dead rows outnumber 20 - d live ones at the 8th
    # delete; compacted to its 12 live rows, with the 4 deleted since.
    assert footprint.rows == 12
    hits = daemon.search.search(ADMIN, cube_id, "edit 27 of note 0", 1, SearchFilters()).hits
    assert [hit.memory.id for hit in hits] == [views[0].id]
    assert daemon.indexes.get(cube_id).verify_ann(sample=100).clean
    daemon.stop()
