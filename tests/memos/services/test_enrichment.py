"""Notes are enriched and linked off the request path, survive crashes, never duplicate links."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from memcube.enrichment import make_enricher
from memos.daemon import Daemon
from memos.services.auth import ADMIN_USER_ID
from memos.services.views import NewMemory, Principal
from memos.settings import Settings
from tests.conftest import make_daemon_process

ADMIN = Principal(ADMIN_USER_ID, True)
TURNS = [
    ("Caroline", "I went to the LGBTQ support group yesterday and it was so powerful."),
    ("Melanie", "That's great! I painted a sunrise over the lake last weekend."),
    ("Caroline", "I'm researching adoption agencies; I want to give a kid a loving home."),
    ("Melanie", "My kids love pottery, we made a bowl together at the art studio."),
]


def wait_enriched(client, cube_id, timeout=300):
    deadline = time.time() + timeout
    while client.get(f"/v1/cubes/{cube_id}").json()["stats"]["enrichment_pending"]:
        assert time.time() < deadline, "enrichment did not finish"
        time.sleep(0.1)
    return client.get(f"/v1/cubes/{cube_id}/memories", params={"limit": 500}).json()["items"]


def add_session(client, cube_id, session="s1"):
    items = [
        {"content": text, "speaker": who, "session_id": session,
         "timestamp": "2023-05-08T13:56:00Z"}
        for who, text in TURNS
    ]  # fmt: skip
    return client.post(f"/v1/cubes/{cube_id}/memories", json={"items": items}).json()["items"]


@pytest.fixture(scope="module")
def enriching(tmp_path_factory):
    daemon = make_daemon_process(
        tmp_path_factory.mktemp("enrich"), MEMOS_ENRICHMENT__ENABLED="true"
    )
    daemon.start()
    yield daemon
    daemon.stop()


def test_adds_return_at_once_then_notes_are_enriched_and_linked(enriching):
    with enriching.client() as client:
        cube_id = client.post("/v1/cubes", json={"name": secrets.token_hex(3)}).json()["id"]
        added = add_session(client, cube_id)
        assert all(m["keywords"] == [] and m["enrichment"] == "pending" for m in added)
        notes = {m["id"]: m for m in wait_enriched(client, cube_id)}
    ids = [m["id"] for m in added]
    for note in notes.values():
        assert note["enrichment"] == "done" and note["version"] == 1
        assert note["keywords"] and note["tags"] and note["context"]
    first = notes[ids[0]]
    assert "2023-05-07" in first["keywords"]  # "yesterday", resolved against the timestamp
    assert any("lgbtq" in k for k in first["keywords"])
    assert "Caroline" in first["context"]
    # follows: each turn links to its neighbours in the session, both directions.
    for i, note_id in enumerate(ids):
        follows = {link["id"] for link in notes[note_id]["links"] if link["kind"] == "follows"}
        assert follows == {ids[j] for j in (i - 1, i + 1) if 0 <= j < len(ids)}
    # Every link is stored both ways with the same kind and score, and never twice.
    for note_id, note in notes.items():
        assert max(Counter((x["id"], x["kind"]) for x in note["links"]).values()) == 1
        for link in note["links"]:
            back = [
                x
                for x in notes[link["id"]]["links"]
                if x["id"] == note_id and x["kind"] == link["kind"]
            ]
            assert back and back[0]["score"] == pytest.approx(link["score"])
    # History shows the enriched first version.
    with enriching.client() as client:
        history = client.get(f"/v1/cubes/{cube_id}/memories/{ids[0]}/history").json()["items"]
    assert history[0]["keywords"] == first["keywords"]


def test_an_edit_re_enriches_and_relinks_without_duplicates(enriching):
    with enriching.client() as client:
        cube_id = client.post("/v1/cubes", json={"name": secrets.token_hex(3)}).json()["id"]
        ids = [m["id"] for m in add_session(client, cube_id)]
        wait_enriched(client, cube_id)
        path = f"/v1/cubes/{cube_id}/memories/{ids[1]}"
        edited = client.patch(
            path, json={"content": "I adopted a rescue greyhound named Bolt."}
        ).json()
        assert (edited["version"], edited["enrichment"], edited["keywords"]) == (2, "pending", [])
        notes = {m["id"]: m for m in wait_enriched(client, cube_id)}
    note = notes[ids[1]]
    assert note["enrichment"] == "done" and any(
        "greyhound" in k or "bolt" in k for k in note["keywords"]
    )
    assert {x["id"] for x in note["links"] if x["kind"] == "follows"} == {ids[0], ids[2]}
    for other in notes.values():
        assert max(Counter((x["id"], x["kind"]) for x in other["links"]).values()) == 1


def test_a_crash_mid_enrichment_resumes_at_restart(tmp_path):
    daemon = make_daemon_process(tmp_path, MEMOS_ENRICHMENT__ENABLED="true")
    daemon.start()
    with daemon.client() as client:
        cube_id = client.post("/v1/cubes", json={"name": "crash"}).json()["id"]
        for session in range(4):
            add_session(client, cube_id, session=f"s{session}")
    daemon.kill()  # wherever the worker is: before, during or after these notes
    # Then notes that are certainly pending at a kill, however fast the machine: the worker
    # is off while they are added (it used to be "hope the machine is slow").
    daemon.env["MEMOS_ENRICHMENT__ENABLED"] = "false"
    daemon.start()
    with daemon.client() as client:
        for session in range(4, 8):
            add_session(client, cube_id, session=f"s{session}")
        pending = client.get(f"/v1/cubes/{cube_id}").json()["stats"]["enrichment_pending"]
    daemon.kill()
    assert pending >= 16
    daemon.env["MEMOS_ENRICHMENT__ENABLED"] = "true"
    daemon.start()
    with daemon.client() as client:
        notes = wait_enriched(client, cube_id)
    assert len(notes) == 32 and all(n["enrichment"] == "done" for n in notes)
    for note in notes:
        assert max(Counter((x["id"], x["kind"]) for x in note["links"]).values()) == 1
        assert len([x for x in note["links"] if x["kind"] == "follows"]) in (1, 2)
    daemon.stop()


class BrokenEnricher:
    """A plug-in that always fails, to show a failure never wedges the queue."""

    name = "broken"

    def enrich(self, notes):
        raise RuntimeError("model server unreachable")


def test_a_failing_enricher_marks_notes_failed_and_moves_on(tmp_path, embedder):
    daemon = Daemon(
        Settings(data_dir=tmp_path, admin_key="k" * 20, enrichment={"enabled": False}),
        embedder=embedder,
    )
    daemon.start()
    cube = daemon.cubes.create(ADMIN, "c", "")
    now = datetime.now(UTC)
    daemon.memories.add(ADMIN, cube.id, [NewMemory(t, "s", w, now, {}) for w, t in TURNS])
    daemon.enrichment.enricher = BrokenEnricher()
    assert daemon.enrichment.run_once() == 4
    assert daemon.cubes.get(ADMIN, cube.id).stats.enrichment_pending == 0
    page = daemon.memories.page(ADMIN, cube.id, None, 10, None)
    assert [m.enrichment for m in page.items] == ["failed"] * 4
    daemon.enrichment.enricher = make_enricher("local", embedder.embed)
    assert daemon.enrichment.run_once() == 0  # failed notes are not retried in a loop
    daemon.stop()
