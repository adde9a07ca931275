"""`DELETE ...?erase=true` erases for good: content, history, links, vectors, index entries, the
activations built from it and, on SQLite, the bytes in the database file. SQLite and PG."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
from sqlalchemy import func, or_, select

from memos.db.models import Activation, Link, Memory, MemoryHistory
from memos.db.types import utcnow


def _seq_and_vector(daemon, memory_id):
    with daemon.db.read() as s:
        row = s.scalar(select(Memory).where(Memory.id == memory_id))
        return row.seq, bytes(row.embedding)


def _files_hold(paths, needle: bytes) -> bool:
    return any(p.exists() and needle in p.read_bytes() for p in paths)


def _activation(daemon, cube_id, source) -> str:
    """A catalogue row with a stand-in file, as a build would leave them (no model needed)."""
    activation_id = f"act_{secrets.token_hex(10)}"
    with daemon.db.write() as s:
        s.add(
            Activation(
                id=activation_id, cube_id=cube_id, model="m", source=source, compression={},
                tokens=3, kept_tokens=3, bits=4, bytes=10, state="ready", progress=1.0,
                created_at=utcnow(),
            )
        )  # fmt: skip
    directory = daemon.settings.activation_dir / cube_id / activation_id
    directory.mkdir(parents=True)
    (directory / "blob.safetensors").write_bytes(b"kv")
    return activation_id


def test_erase_leaves_no_trace(server, tenant):
    client, cube_id = tenant
    daemon = server.daemon
    marker = f"zq{secrets.token_hex(6)}xj"
    long_marker = f"qz{secrets.token_hex(6)}jx"
    items = [
        {"content": f"{marker} first", "session_id": "s-erase", "metadata": {"m": marker}},
        {"content": "an unrelated neighbour", "session_id": "s-other"},
        {"content": f"{long_marker} " + "filler text " * 2000},  # spills to overflow pages
    ]
    a, b, d = (
        m["id"]
        for m in client.post(f"/v1/cubes/{cube_id}/memories", json={"items": items}).json()["items"]
    )
    path = f"/v1/cubes/{cube_id}/memories"
    assert client.patch(f"{path}/{a}", json={"content": f"{marker} second"}).status_code == 200
    seq_a, vector_a = _seq_and_vector(daemon, a)
    seq_b, _ = _seq_and_vector(daemon, b)
    with daemon.db.write() as s:  # links as enrichment would make them, both ways
        s.add_all(
            Link(cube_id=cube_id, src_seq=x, dst_seq=y, kind="similar", score=0.9)
            for x, y in ((seq_a, seq_b), (seq_b, seq_a))
        )
    from_a = _activation(daemon, cube_id, {"memory_ids": [b, a]})
    from_session = _activation(daemon, cube_id, {"session_id": "s-erase"})
    from_text = _activation(daemon, cube_id, {"text_chars": 5})
    from_b = _activation(daemon, cube_id, {"memory_ids": [b]})
    from_sessions = _activation(daemon, cube_id, {"session_ids": ["s-other", "s-erase"]})
    from_other = _activation(daemon, cube_id, {"session_ids": ["s-other"]})
    daemon.indexes.save_all()
    hnsw = daemon.settings.index_dir / cube_id / "hnsw.bin"
    assert vector_a in hnsw.read_bytes()  # the scan can see a vector when it is there
    db_files = []
    if server.backend == "sqlite":
        db_path = Path(daemon.db.url.removeprefix("sqlite:///"))
        db_files = [db_path, Path(f"{db_path}-wal")]
        assert _files_hold(db_files, marker.encode())
        assert _files_hold(db_files, long_marker.encode())

    assert client.delete(f"{path}/{a}", params={"erase": "true"}).status_code == 204
    assert client.delete(f"{path}/{d}", params={"erase": "true"}).status_code == 204

    for gone in (a, d):
        for suffix in ("", "/history"):
            r = client.get(f"{path}/{gone}{suffix}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "memory_not_found"
    assert [m["id"] for m in client.get(path).json()["items"]] == [b]
    assert client.get(f"{path}/{b}").json()["links"] == []
    for query in (marker, long_marker):
        hits = client.post(f"/v1/cubes/{cube_id}/search", json={"query": query}).json()["hits"]
        assert [h["memory"]["id"] for h in hits] in ([], [b])
    assert client.get(f"/v1/cubes/{cube_id}").json()["stats"]["memories"] == 1
    with daemon.db.read() as s:
        assert s.scalar(select(func.count()).where(Memory.id.in_([a, d]))) == 0
        assert s.scalar(select(func.count()).where(MemoryHistory.memory_seq == seq_a)) == 0
        links = select(func.count()).where(or_(Link.src_seq == seq_a, Link.dst_seq == seq_a))
        assert s.scalar(links) == 0
        left = set(s.scalars(select(Activation.id).where(Activation.cube_id == cube_id)))
    assert left == {from_text, from_b, from_other}
    activation_dir = daemon.settings.activation_dir / cube_id
    assert sorted(p.name for p in activation_dir.iterdir()) == sorted([from_text, from_b,
                                                                        from_other])  # fmt: skip
    assert from_a not in left and from_session not in left and from_sessions not in left
    # The saved index holds no copy of the vector, and still agrees with the database.
    assert vector_a not in hnsw.read_bytes()
    index = daemon.indexes.get(cube_id)
    assert index.verify_ann().clean and index.live_count == 1
    if db_files:  # the erase checkpointed the WAL; secure_delete zeroed the freed pages
        assert not _files_hold(db_files, marker.encode())
        assert not _files_hold(db_files, long_marker.encode())


def test_erase_is_for_the_owner_and_takes_soft_deleted_memories(server):
    _, owner_key = server.new_user()
    writer_id, writer_key = server.new_user()
    with server.client(owner_key) as owner, server.client(writer_key) as writer:
        cube_id = owner.post("/v1/cubes", json={"name": "c"}).json()["id"]
        owner.post(f"/v1/cubes/{cube_id}/grants", json={"user_id": writer_id, "role": "writer"})
        path = f"/v1/cubes/{cube_id}/memories"
        ids = [
            m["id"]
            for m in owner.post(
                path, json={"items": [{"content": "one"}, {"content": "two"}]}
            ).json()["items"]
        ]
        r = writer.delete(f"{path}/{ids[0]}", params={"erase": "true"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert writer.delete(f"{path}/{ids[0]}").status_code == 204  # a soft delete is fine
        assert len(owner.get(f"{path}/{ids[0]}/history").json()["items"]) == 2  # kept
        # The soft-deleted memory can still be erased, and then its history is gone too.
        assert owner.delete(f"{path}/{ids[0]}", params={"erase": "true"}).status_code == 204
        assert owner.get(f"{path}/{ids[0]}/history").status_code == 404
        r = owner.delete(f"{path}/{ids[1]}", params={"erase": "true"}, headers={"If-Match": '"7"'})
        assert r.status_code == 412 and owner.get(f"{path}/{ids[1]}").status_code == 200
        r = owner.delete(f"{path}/{ids[1]}", params={"erase": "true"}, headers={"If-Match": '"1"'})
        assert r.status_code == 204
        for missing in (ids[1], "mem_nope"):
            r = owner.delete(f"{path}/{missing}", params={"erase": "true"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "memory_not_found"
        # The cube goes on working: adds, search, and an index reloaded from its files.
        owner.post(path, json={"items": [{"content": "three"}]})
        server.daemon.indexes._indexes.pop(cube_id)
        hits = owner.post(f"/v1/cubes/{cube_id}/search", json={"query": "three"}).json()["hits"]
        assert [h["memory"]["content"] for h in hits] == ["three"]
        assert server.daemon.indexes.get(cube_id).verify_ann().clean


def test_erased_vectors_are_zeroed_in_memory(tenant, server):
    client, cube_id = tenant
    path = f"/v1/cubes/{cube_id}/memories"
    memory_id = client.post(path, json={"items": [{"content": "forget me"}]}).json()["items"][0][
        "id"
    ]
    client.patch(f"{path}/{memory_id}", json={"content": "forget me too"})
    seq, _ = _seq_and_vector(server.daemon, memory_id)
    index = server.daemon.indexes.get(cube_id)
    rows = np.flatnonzero(index._rows.seqs[: index._rows.size] == seq)
    assert len(rows) == 2 and np.abs(index._rows.vectors[rows]).sum() > 0  # both versions
    assert client.delete(f"{path}/{memory_id}", params={"erase": "true"}).status_code == 204
    assert np.abs(index._rows.vectors[rows]).sum() == 0
    assert "forget" not in index._bm25._df
