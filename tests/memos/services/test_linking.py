"""Enriched vectors, near-duplicates and evolution, driven one batch at a time in process."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import select

from memcube.notes import embedding_text
from memos.daemon import Daemon
from memos.db.models import Memory
from memos.services.auth import ADMIN_USER_ID
from memos.services.views import NewMemory, Principal
from memos.settings import Settings

ADMIN = Principal(ADMIN_USER_ID, True)
MAY_8 = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
JULY_2 = datetime(2023, 7, 2, 10, 0, tzinfo=UTC)


@pytest.fixture
def daemon(tmp_path, embedder):
    # The worker thread is off: the tests drive enrichment with `run_once`.
    daemon = Daemon(
        Settings(data_dir=tmp_path, admin_key="k" * 20, enrichment={"enabled": False}),
        embedder=embedder,
    )
    daemon.start()
    yield daemon
    daemon.stop()


def add(daemon, cube_id, *turns):
    """turns: (speaker, content, session, timestamp) -> the new memory ids, in order."""
    items = [NewMemory(text, session, who, when, {}) for who, text, session, when in turns]
    return [m.id for m in daemon.memories.add(ADMIN, cube_id, items)]


def stored(daemon, memory_id) -> Memory:
    with daemon.db.read() as s:
        return s.scalars(select(Memory).where(Memory.id == memory_id)).one()


def links(daemon, cube_id, memory_id, kind):
    view = daemon.memories.get(ADMIN, cube_id, memory_id)
    return {(link.id, link.score) for link in view.links if link.kind == kind}


def test_an_enriched_note_is_re_embedded_with_its_keywords_tags_context_and_prompt(
    daemon, embedder
):
    cube = daemon.cubes.create(ADMIN, "c", "")
    first, second = add(
        daemon,
        cube.id,
        ("Melanie", "How was the support group you went to?", "s1", MAY_8),
        ("Caroline", "Yes, it was amazing! I felt so accepted.", "s1", MAY_8),
    )
    raw = np.frombuffer(stored(daemon, second).embedding, dtype=np.float32)
    assert np.allclose(raw, embedder.embed_one("Yes, it was amazing! I felt so accepted."))
    assert daemon.enrichment.run_once() == 2
    row = stored(daemon, second)
    assert row.enrichment == "done" and row.keywords and row.tags and row.context
    text = embedding_text(
        row.content, row.keywords, row.tags, row.context, "How was the support group you went to?"
    )
    assert text.startswith("How was the support group you went to?\nYes, it was amazing!")
    assert f"\nTags: {', '.join(row.tags)}\n{row.context}" in text
    vector = np.frombuffer(row.embedding, dtype=np.float32)
    np.testing.assert_allclose(vector, embedder.embed([text])[0], atol=1e-5)
    # The index serves the enriched vector: searching with it finds the note at cosine 1.
    index = daemon.indexes.get(cube.id)
    (hit,) = index.search(vector, "", 1, mode="dense")
    assert hit.seq == row.seq and hit.signals["dense"] == pytest.approx(1.0, abs=1e-5)
    # The first turn of a session has no prompt before it.
    head = stored(daemon, first)
    assert embedding_text(head.content, head.keywords, head.tags, head.context).startswith(
        "How was the support group"
    )


def test_a_near_duplicate_is_linked_and_shown_once(daemon):
    cube = daemon.cubes.create(ADMIN, "c", "")
    said = "I signed up for a pottery class at the community centre on Tuesdays."
    (original,) = add(daemon, cube.id, ("Melanie", said, "s1", MAY_8))
    daemon.enrichment.run_once()
    repeat, elsewhere = add(
        daemon,
        cube.id,
        ("Melanie", said.replace("I signed", "I've signed"), "s1", MAY_8),
        ("Melanie", said, "s2", JULY_2),  # another session: not a duplicate
    )
    daemon.enrichment.run_once()
    ((partner, score),) = links(daemon, cube.id, repeat, "duplicate")
    assert partner == original and 0.9 <= score < 1.0
    assert {p for p, _ in links(daemon, cube.id, original, "duplicate")} == {repeat}
    assert links(daemon, cube.id, elsewhere, "duplicate") == set()
    hits = daemon.search.search(ADMIN, cube.id, "pottery class on Tuesdays", 10, filters())
    ids = [hit.memory.id for hit in hits.hits]
    assert len({original, repeat} & set(ids)) == 1 and elsewhere in ids


def filters():
    from memcube.types import SearchFilters

    return SearchFilters()


def test_a_revision_links_updates_and_evolves_the_older_note(daemon, embedder):
    cube = daemon.cubes.create(ADMIN, "c", "")
    (old,) = add(
        daemon,
        cube.id,
        ("Caroline", "I work as a nurse at the children's hospital downtown.", "s1", MAY_8),
    )
    daemon.enrichment.run_once()
    before = stored(daemon, old)
    (new,) = add(
        daemon,
        cube.id,
        (
            "Caroline",
            "I don't work at the children's hospital anymore; now I teach nursing students.",
            "s2",
            JULY_2,
        ),
    )
    daemon.enrichment.run_once()
    assert {p for p, _ in links(daemon, cube.id, new, "updates")} == {old}
    assert {p for p, _ in links(daemon, cube.id, old, "updates")} == {new}
    after = stored(daemon, old)
    assert after.version == before.version + 1 == 2
    assert after.context.startswith(before.context)
    assert "Revised on 2 July 2023 (" in after.context and "hospital" in after.context
    assert set(before.tags) <= set(after.tags)
    expected = embedding_text(after.content, after.keywords, after.tags, after.context)
    np.testing.assert_allclose(
        np.frombuffer(after.embedding, dtype=np.float32), embedder.embed([expected])[0], atol=1e-5
    )
    history = daemon.memories.history(ADMIN, cube.id, old)
    assert [(h.version, h.reason) for h in history] == [
        (1, "created"),
        (2, f"evolved: revised by {new}"),
    ]
    assert history[0].context == before.context and history[1].context == after.context
    # A later note on another subject evolves nothing.
    add(daemon, cube.id, ("Caroline", "Now I go running every morning.", "s2", JULY_2))
    daemon.enrichment.run_once()
    assert stored(daemon, old).version == 2
