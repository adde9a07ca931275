"""Index registry: a cube embedded in another vector space is re-embedded before use."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from sqlalchemy import select

from memcube.embedder import Embedder, EmbedderConfig
from memcube.types import SearchFilters
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
