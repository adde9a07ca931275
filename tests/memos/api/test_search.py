"""Search: hybrid ranking, filters, top_k, and what it returns."""

from __future__ import annotations

import pytest

DOCS = [
    {
        "content": "Caroline adopted a golden retriever puppy named Max.",
        "session_id": "s1",
        "speaker": "Caroline",
        "timestamp": "2023-05-01T10:00:00Z",
        "metadata": {"topic": "pets"},
    },
    {
        "content": "Melanie ran a charity race for mental health awareness.",
        "session_id": "s1",
        "speaker": "Melanie",
        "timestamp": "2023-05-02T10:00:00Z",
        "metadata": {"topic": "sport"},
    },
    {
        "content": "We went camping by the lake and roasted marshmallows.",
        "session_id": "s2",
        "speaker": "Melanie",
        "timestamp": "2023-06-10T10:00:00Z",
        "metadata": {"topic": "travel"},
    },
    {
        "content": "My dog loves chasing tennis balls at the park.",
        "session_id": "s2",
        "speaker": "Caroline",
        "timestamp": "2023-07-15T10:00:00Z",
        "metadata": {"topic": "pets", "n": 2},
    },
    {
        "content": "The quarterly tax report is due on Friday.",
        "session_id": "s3",
        "speaker": "Melanie",
        "timestamp": "2023-08-01T10:00:00Z",
        "metadata": {"topic": "work"},
    },
]


def _seed(client, cube_id):
    items = client.post(f"/v1/cubes/{cube_id}/memories", json={"items": DOCS}).json()["items"]
    return [m["id"] for m in items]


def _search(client, cube_id, **body):
    r = client.post(f"/v1/cubes/{cube_id}/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_semantic_and_lexical_matches_rank_first(tenant):
    client, cube_id = tenant
    ids = _seed(client, cube_id)
    # Dense only: no shared words with the puppy/dog notes.
    hits = _search(client, cube_id, query="canine companion", top_k=2)["hits"]
    assert {h["memory"]["id"] for h in hits} == {ids[0], ids[3]}
    # Lexical: a rare exact word.
    top = _search(client, cube_id, query="marshmallows", top_k=1)["hits"][0]
    assert top["memory"]["id"] == ids[2]
    assert top["signals"]["lexical"] > 0 and "dense" in top["signals"]


def test_result_shape_and_scores_descend(tenant):
    client, cube_id = tenant
    _seed(client, cube_id)
    body = _search(client, cube_id, query="dog", top_k=3)
    assert set(body) == {"hits", "took_ms"} and body["took_ms"] > 0
    assert len(body["hits"]) == 3
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert set(body["hits"][0]) >= {"memory", "score"}


def test_top_k_bounds_results(tenant):
    client, cube_id = tenant
    _seed(client, cube_id)
    assert len(_search(client, cube_id, query="the", top_k=1)["hits"]) == 1
    assert len(_search(client, cube_id, query="anything at all", top_k=50)["hits"]) == 5


def test_filters_session_time_metadata(tenant):
    client, cube_id = tenant
    ids = _seed(client, cube_id)

    def found(**filters):
        hits = _search(client, cube_id, query="dog pets puppy", top_k=10, filters=filters)["hits"]
        return {h["memory"]["id"] for h in hits}

    assert found(session_id="s2") == {ids[2], ids[3]}
    assert found(session_id="nope") == set()
    assert found(since="2023-06-10T10:00:00Z") == {ids[2], ids[3], ids[4]}  # since is inclusive
    assert found(until="2023-06-10T10:00:00Z") == {ids[0], ids[1]}  # until is exclusive
    assert found(since="2023-05-02T00:00:00Z", until="2023-07-01T00:00:00+00:00") == {
        ids[1],
        ids[2],
    }
    assert found(metadata={"topic": "pets"}) == {ids[0], ids[3]}
    assert found(metadata={"topic": "pets", "n": 2}) == {ids[3]}
    assert found(metadata={"n": "2"}) == set()  # equality is typed: 2 is not "2"
    assert found(session_id="s1", metadata={"topic": "pets"}) == {ids[0]}


def test_empty_cube_returns_no_hits(tenant):
    client, cube_id = tenant
    assert _search(client, cube_id, query="anything")["hits"] == []


def test_a_foreign_seq_in_a_cube_index_never_leaks_another_cube(server):
    """Defence in depth: the rows behind a cube's hits are fetched by cube and seq, so even an
    index that holds another tenant's seq (a bug, a corrupt file) cannot show that memory."""
    from sqlalchemy import select

    from memcube.notes import to_doc
    from memos.db.models import Memory

    owners = []
    for content in ("Alice keeps bees on the roof.", "Bob's bank PIN is 4921, keep it secret."):
        _, key = server.new_user()
        client = server.client(key)
        cube_id = client.post("/v1/cubes", json={"name": "c"}).json()["id"]
        item = client.post(f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": content}]})
        owners.append((client, cube_id, item.json()["items"][0]["id"]))
    (alice, alice_cube, alice_id), (bob, _, bob_id) = owners
    with server.daemon.db.read() as s:
        bobs_row = s.scalar(select(Memory).where(Memory.id == bob_id))
        index = server.daemon.indexes.get(alice_cube)
        index.apply([to_doc(bobs_row)], [], index.generation)
    hits = _search(alice, alice_cube, query="Bob's bank PIN secret", top_k=5)["hits"]
    assert [h["memory"]["id"] for h in hits] == [alice_id]
    alice.close()
    bob.close()


def test_the_only_perfect_hit_scores_1(tenant):
    client, cube_id = tenant
    content = "Caroline adopted a golden retriever puppy named Max."
    client.post(f"/v1/cubes/{cube_id}/memories", json={"items": [{"content": content}]})
    (hit,) = _search(client, cube_id, query=content, top_k=5)["hits"]
    assert hit["score"] == 1.0  # every term present (and a cosine of ~1.0)
    assert hit["signals"]["dense"] == pytest.approx(1.0, abs=1e-5)
    assert hit["signals"]["rank"] == 0.0  # the fused z-score of a lone candidate, kept raw


def test_scores_are_relevance_in_0_1_never_rising_down_the_ranking(tenant):
    client, cube_id = tenant
    _seed(client, cube_id)
    for query in ("dog", "quarterly taxes", "xylophone zeppelin", "marshmallows by the lake"):
        hits = _search(client, cube_id, query=query, top_k=5)["hits"]
        assert len(hits) == 5
        scores = [h["score"] for h in hits]
        assert all(0.0 <= s <= 1.0 for s in scores), scores
        assert scores == sorted(scores, reverse=True)
        ranks = [h["signals"]["rank"] for h in hits]
        assert ranks == sorted(ranks, reverse=True)  # the ranking is the fused order
        # Each score is the running minimum of max(cosine, term coverage) down the list.
        assert scores[0] >= max(hits[0]["signals"]["dense"], 0.0)
    top = _search(client, cube_id, query="marshmallows", top_k=1)["hits"][0]
    assert top["score"] == 1.0  # it holds every term of the query
    unrelated = _search(client, cube_id, query="xylophone zeppelin", top_k=5)["hits"]
    assert unrelated[0]["score"] < 0.3  # nothing matches: no term, a low cosine
