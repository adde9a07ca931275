"""Notes are enriched and linked off the request path, survive crashes, never duplicate links."""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import select

from memcube.enrichment import LlmEnricher, NoteInput, make_enricher
from memcube.types import SearchFilters
from memos.db.models import Memory
from memos.db.types import utcnow
from tests.conftest import make_daemon_process
from tests.memos.services.factories import (
    ADMIN,
    TURNS,
    BrokenEnricher,
    add_turns,
    make_daemon,
    states,
)


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
    assert first["dates"] == ["2023-05-07"]  # "yesterday", resolved against the timestamp
    assert "2023-05-07" not in first["keywords"]  # dates are not keywords
    assert notes[ids[1]]["dates"] == ["2023-05-06"]  # "last weekend", said on a Monday
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
    assert history[0]["dates"] == ["2023-05-07"]


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


class PoisonedEnricher:
    """`local`, except that any batch holding a note with "POISON" raises: one bad note."""

    name = "poisoned"

    def __init__(self, local):
        self.local = local
        self.calls = []

    def enrich(self, notes):
        self.calls.append(len(notes))
        if any("POISON" in note.content for note in notes):
            raise MemoryError("out of memory on a poisoned note")
        return self.local.enrich(notes)


def test_a_failing_enricher_records_the_attempt_and_moves_on(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder)
    cube_id, _ = add_turns(daemon)
    daemon.enrichment.enricher = BrokenEnricher()
    assert daemon.enrichment.run_once() == 4
    assert daemon.cubes.get(ADMIN, cube_id).stats.enrichment_pending == 0
    error = "RuntimeError: model server unreachable"
    assert states(daemon, cube_id) == [("retrying", 1, error)] * 4
    daemon.enrichment.enricher = make_enricher("local", embedder.embed)
    assert daemon.enrichment.run_once() == 0  # the retry job takes them, not the worker
    daemon.stop()


@pytest.mark.parametrize("runtime_state", ["disabled", "missing_model"])
def test_the_llm_enricher_on_a_runtime_that_cannot_run_falls_back_to_local_for_each_note(
    tmp_path, embedder, runtime_state, caplog
):
    """Today's code let the runtime's Unavailable fail the whole batch: all four "failed"."""
    if runtime_state == "disabled":
        broken = {"activations": {"enabled": False}}
        reason = "Unavailable: the local runtime is disabled (activations.enabled=false)"
    else:  # a model directory with no weights in it: the runtime cannot load
        (tmp_path / "no-model").mkdir()
        broken = {"runtime": {"model": str(tmp_path / "no-model")}}
        reason = (
            f"Unavailable: cannot load model '{tmp_path / 'no-model'}': "
            "Couldn't instantiate the backend tokenizer from one of:"
        )  # the first line of what the runtime raised
    daemon = make_daemon(tmp_path, embedder, enrichment={"enricher": "llm"}, **broken)
    assert isinstance(daemon.enrichment.enricher, LlmEnricher)
    cube_id, ids = add_turns(daemon)
    with caplog.at_level(logging.INFO, logger="memcube.enrichment.llm"):
        assert daemon.enrichment.run_once() == 4
    # Asked once: the runtime said it cannot run, so the rest of the batch went to local too.
    assert [r.getMessage() for r in caplog.records if r.name == "memcube.enrichment.llm"] == [
        f"llm enrichment fell back to local: {reason}"
    ]
    notes = daemon.memories.page(ADMIN, cube_id, None, 10, None).items
    assert [m.enrichment for m in notes] == ["done"] * 4
    assert [(m.enrichment, m.enrichment_attempts, m.enrichment_error) for m in notes] == [
        ("done", 0, None)
    ] * 4
    local = make_enricher("local", embedder.embed).enrich(
        [NoteInput(t, w, "s", datetime(2023, 5, 8, 13, 56, tzinfo=UTC)) for w, t in TURNS]
    )
    assert [(m.keywords, m.tags, m.context) for m in notes] == [
        (list(e.keywords), list(e.tags), e.context) for e in local
    ]
    assert (daemon.enrichment.enricher.answered, daemon.enrichment.enricher.fell_back) == (0, 4)
    daemon.stop()


def test_a_note_that_breaks_the_enricher_fails_alone(tmp_path, embedder):
    """Today's code parked the whole batch as failed for one bad note."""
    daemon = make_daemon(tmp_path, embedder)
    turns = [TURNS[0], ("Melanie", "POISON: a note the enricher cannot take."), *TURNS[1:3]]
    cube_id, ids = add_turns(daemon, turns)
    poisoned = PoisonedEnricher(make_enricher("local", embedder.embed))
    daemon.enrichment.enricher = poisoned
    before = utcnow()
    assert daemon.enrichment.run_once() == 4
    after = utcnow()
    notes = daemon.memories.page(ADMIN, cube_id, None, 10, None).items
    assert [m.enrichment for m in notes] == ["done", "retrying", "done", "done"]
    assert poisoned.calls == [4, 1, 1, 1, 1]  # the batch, then each note alone
    error = "MemoryError: out of memory on a poisoned note"
    assert states(daemon, cube_id) == [
        ("done", 0, None), ("retrying", 1, error), ("done", 0, None), ("done", 0, None)
    ]  # fmt: skip
    with daemon.db.read() as s:
        next_at = s.scalar(select(Memory.enrichment_next_at).where(Memory.id == ids[1]))
    assert before + timedelta(seconds=60) <= next_at <= after + timedelta(seconds=60)
    daemon.stop()


class EditingEnricher:
    """Fails after the user edited the note it was enriching: the edit lands mid-attempt."""

    name = "editing"

    def __init__(self, daemon, cube_id, memory_id):
        self.daemon, self.cube_id, self.memory_id = daemon, cube_id, memory_id

    def enrich(self, notes):
        self.daemon.memories.update(
            ADMIN, self.cube_id, self.memory_id, "I adopted a greyhound named Bolt.", None
        )
        raise RuntimeError("model server unreachable")


def test_a_failure_never_marks_the_newer_version_an_edit_made_meanwhile(tmp_path, embedder):
    """Today's code marked the failure by seq alone: the edited version 2 came out "failed"."""
    daemon = make_daemon(tmp_path, embedder)
    cube_id, (memory_id,) = add_turns(daemon, TURNS[:1])
    daemon.enrichment.enricher = EditingEnricher(daemon, cube_id, memory_id)
    assert daemon.enrichment.run_once() == 1
    note = daemon.memories.get(ADMIN, cube_id, memory_id)
    assert (note.version, note.content) == (2, "I adopted a greyhound named Bolt.")
    assert note.enrichment == "pending"
    assert (note.enrichment, note.enrichment_attempts, note.enrichment_error) == (
        "pending", 0, None
    )  # fmt: skip
    daemon.enrichment.enricher = make_enricher("local", embedder.embed)
    assert daemon.enrichment.run_once() == 1
    note = daemon.memories.get(ADMIN, cube_id, memory_id)
    assert (note.version, note.enrichment, note.keywords) == (
        2,
        "done",
        ["greyhound named bolt", "adopted"],
    )
    daemon.stop()


def test_two_notes_sharing_only_a_date_are_not_linked_as_the_same_entity(tmp_path, embedder):
    """Today's code kept "2023-05-07" among both notes' keywords, so they were same_entity."""
    daemon = make_daemon(tmp_path, embedder)
    cube_id, ids = add_turns(
        daemon,
        [("Caroline", "I flew to Paris yesterday for a conference."),
         ("Melanie", "My sister baked sourdough bread yesterday.")],
    )  # fmt: skip
    daemon.enrichment.enricher = make_enricher("local", embedder.embed)
    assert daemon.enrichment.run_once() == 2
    paris, bread = daemon.memories.page(ADMIN, cube_id, None, 10, None).items
    assert [link.kind for link in paris.links] == ["follows"]  # same session, nothing else
    assert (paris.keywords, bread.keywords) == (
        ["paris", "conference", "flew"], ["sister baked sourdough", "bread"]
    )  # fmt: skip
    assert paris.dates == bread.dates == [date(2023, 5, 7)]
    # The temporal signal reads `dates`: both were said on 8 May and speak of the 7th.
    found = daemon.search.search(ADMIN, cube_id, "What happened on 7 May 2023?", 2,
                                 SearchFilters())  # fmt: skip
    assert sorted(hit.memory.id for hit in found.hits) == sorted(ids)
    assert [hit.signals["temporal"] for hit in found.hits] == [1.0, 1.0]
    assert [link.kind for link in paris.links] == ["follows"]  # same session, nothing else
    assert [link.kind for link in bread.links] == ["follows"]
    daemon.stop()
