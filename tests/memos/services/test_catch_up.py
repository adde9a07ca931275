"""Index catch-up: two daemons' index registries over one SQLite database (no processes).

Daemon A writes through its services; daemon B, which loaded the cube before, catches up by
replaying the rows whose `change_seq` is newer than its index (`IndexRegistry.catch_up`).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from memcube.types import SearchFilters
from memcube.vector_index import read_manifest
from memos.daemon import Daemon
from memos.db.models import Cube
from memos.services.auth import ADMIN_USER_ID
from memos.services.fleet.changes import ChangeFeed, Notice, parse_notice
from memos.services.views import NewMemory, Principal
from memos.settings import Settings

ADMIN = Principal(ADMIN_USER_ID, True)
NOTES = ["Sven repaired the old bicycle", "Noor baked a lemon tart", "Olga sailed a dinghy"]


@pytest.fixture
def pair(tmp_path, embedder):
    """Daemons A and B on one SQLite file; B's change feed polls too rarely to interfere."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    daemons = []
    for name in ("a", "b"):
        settings = Settings(
            data_dir=tmp_path / name,
            database_url=url,
            admin_key="k" * 20,
            enrichment={"enabled": False},
            scheduler={"enabled": False},
            fleet={"instance_id": f"inst-{name}", "changes_poll_s": 600},
        )
        daemon = Daemon(settings, embedder=embedder)
        daemon.start()
        daemons.append(daemon)
    yield daemons[0], daemons[1]
    for daemon in daemons:
        daemon.stop()


def _add(daemon: Daemon, cube_id: str, *contents: str) -> list[str]:
    now = datetime.now(UTC)
    items = [NewMemory(c, "s", None, now, {}) for c in contents]
    views = daemon.memories.add(ADMIN, cube_id, items)
    return [v.id for v in views]


def _found(daemon: Daemon, cube_id: str, query: str, k: int = 1) -> list[str]:
    result = daemon.search.search(ADMIN, cube_id, query, k, SearchFilters(), mode="lexical")
    return [hit.memory.content for hit in result.hits]


def _generation(daemon: Daemon, cube_id: str) -> int:
    with daemon.db.read() as s:
        return int(s.scalar(select(Cube.generation).where(Cube.id == cube_id)) or 0)


def test_changes_on_a_are_replayed_into_b(pair):
    a, b = pair
    cube = a.cubes.create(ADMIN, "c", "")
    ids = _add(a, cube.id, *NOTES)
    assert b.indexes.catch_up(cube.id).action == "not_loaded"  # loads current on first use
    assert b.indexes.get(cube.id).live_count == 3

    new = _add(a, cube.id, "Ilse tuned a harpsichord")
    a.memories.update(ADMIN, cube.id, ids[1], "Noor baked a rhubarb crumble", None)
    a.memories.delete(ADMIN, cube.id, ids[2])
    assert b.indexes.lagging() == [cube.id]
    assert _found(b, cube.id, "harpsichord") == []  # not replayed yet: B's index lags

    report = b.indexes.catch_up(cube.id)
    assert (report.action, report.replayed, report.erased) == ("replayed", 3, 0)
    assert report.generation == _generation(a, cube.id) == b.indexes.get(cube.id).generation
    assert _found(b, cube.id, "harpsichord") == ["Ilse tuned a harpsichord"]
    assert _found(b, cube.id, "rhubarb crumble") == ["Noor baked a rhubarb crumble"]
    assert _found(b, cube.id, "lemon tart") == []  # the old text left the index
    seqs = b.indexes.get(cube.id).live_seqs()
    assert seqs == a.indexes.get(cube.id).live_seqs() and len(seqs) == 3
    assert b.indexes.lagging() == []
    assert b.indexes.catch_up(cube.id).action == "current"
    assert new  # added on A, found on B above


def test_an_erasure_on_a_is_swept_out_of_b_and_its_saved_index(pair):
    a, b = pair
    cube = a.cubes.create(ADMIN, "c", "")
    ids = _add(a, cube.id, *NOTES)
    b.indexes.get(cube.id)
    a.erasure.erase(ADMIN, cube.id, ids[0])  # leaves no row to replay
    report = b.indexes.catch_up(cube.id)
    assert (report.action, report.erased) == ("swept", 1)
    index = b.indexes.get(cube.id)
    assert index.live_seqs() == a.indexes.get(cube.id).live_seqs()
    assert _found(b, cube.id, "bicycle") == []
    # Saved at once, at the erasure's generation, as an erasure on B itself would.
    manifest = read_manifest(b.indexes.directory(cube.id))
    assert manifest is not None and manifest.generation == _generation(a, cube.id)


def test_a_write_on_b_first_replays_the_changes_it_skipped(pair):
    a, b = pair
    cube = a.cubes.create(ADMIN, "c", "")
    _add(a, cube.id, NOTES[0])
    b.indexes.get(cube.id)
    _add(a, cube.id, NOTES[1])  # B's index has not seen this one...
    _add(b, cube.id, NOTES[2])  # ...and B's own write must not jump over it
    assert b.indexes.get(cube.id).generation == _generation(a, cube.id)
    assert _found(b, cube.id, "lemon tart") == [NOTES[1]]
    assert b.indexes.get(cube.id).live_count == 3


def test_a_search_on_b_sees_a_replayed_transaction_whole(pair):
    a, b = pair
    cube = a.cubes.create(ADMIN, "c", "")
    _add(a, cube.id, *NOTES)
    index = b.indexes.get(cube.id)
    batch = [f"marmalade jar number {i} on the shelf" for i in range(40)]
    _add(a, cube.id, *batch)  # one transaction
    seen: set[int] = set()
    done = threading.Event()
    vector = b.embedder.embed_query("marmalade")

    def search() -> None:
        while not done.is_set():
            seen.add(len(index.search(vector, "marmalade", 100, mode="lexical")))

    reader = threading.Thread(target=search)
    reader.start()
    try:
        assert b.indexes.catch_up(cube.id).replayed == 40
    finally:
        done.set()
        reader.join()
    seen.add(len(index.search(vector, "marmalade", 100, mode="lexical")))
    assert seen <= {0, 40} and 40 in seen


def test_catch_up_keeps_to_the_ram_budget(pair):
    a, b = pair
    b.indexes.max_loaded_bytes = 1  # every cube but the one in use is evicted
    first, second = (a.cubes.create(ADMIN, name, "") for name in ("c1", "c2"))
    _add(a, first.id, NOTES[0])
    _add(a, second.id, NOTES[1])
    b.indexes.get(first.id)
    b.indexes.get(second.id)
    assert b.indexes.loaded() == [second.id]
    _add(a, first.id, NOTES[2])
    assert b.indexes.catch_up(first.id).action == "not_loaded"  # nothing to do: loads current
    assert b.indexes.loaded() == [second.id]
    assert _found(b, first.id, "dinghy") == [NOTES[2]]


def test_the_change_feed_polls_when_there_are_no_notifications(pair):
    """SQLite: no NOTIFY; the feed's poll catches B up on its own."""
    a, b = pair
    cube = a.cubes.create(ADMIN, "c", "")
    _add(a, cube.id, NOTES[0])
    b.indexes.get(cube.id)
    feed = ChangeFeed(b.indexes, b.settings.resolved_database_url, "inst-b", poll_s=0.1)
    assert feed.url is None  # nothing to LISTEN on
    feed.start()
    try:
        _add(a, cube.id, NOTES[1])
        deadline = time.monotonic() + 10
        while b.indexes.lagging() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _found(b, cube.id, "lemon tart") == [NOTES[1]]
        assert feed.caught_up == 1
    finally:
        feed.stop()


def test_notices_are_parsed_strictly():
    assert parse_notice("cube_abc 42") == Notice("cube_abc", 42)
    for payload in ("", "cube_abc", "cube_abc -1", "cube_abc 4 2", " 42", "cube_abc x"):
        assert parse_notice(payload) is None


def test_maintenance_catches_up_and_a_cube_deleted_elsewhere_is_dropped(pair):
    a, b = pair
    cube = a.cubes.create(ADMIN, "c", "")
    _add(a, cube.id, NOTES[0])
    b.indexes.get(cube.id)
    _add(a, cube.id, NOTES[1])
    report = b.indexes.maintain(cube.id)  # the index_maintenance job, as a notice missed
    assert (report.action, report.replayed, report.live) == ("replayed", 1, 2)
    assert b.indexes.lagging() == []
    assert _found(b, cube.id, "lemon tart") == [NOTES[1]]
    manifest = read_manifest(b.indexes.directory(cube.id))  # and saved, as the job does
    assert manifest is not None and manifest.generation == _generation(a, cube.id)

    a.cubes.delete(ADMIN, cube.id)
    assert b.indexes.lagging() == [cube.id]
    assert b.indexes.catch_up(cube.id).action == "dropped"
    assert b.indexes.loaded() == [] and not b.indexes.directory(cube.id).exists()
