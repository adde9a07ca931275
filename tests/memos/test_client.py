"""The SDK against a real daemon over real HTTP (the session-scoped `daemon` fixture).

Each test makes its own user and cube; only the daemon is shared.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from memos.client import (
    ActivationMismatch,
    AsyncMemosClient,
    BadRequest,
    Conflict,
    Cube,
    Forbidden,
    Generation,
    Memory,
    MemoryInput,
    MemosClient,
    MemosConnectionError,
    MemosError,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    QuotaExceeded,
    RateLimited,
    ServerError,
    TooManyRequests,
    Unauthorized,
    User,
    ValidationFailed,
    error_from_response,
)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def admin(daemon: Any) -> Iterator[MemosClient]:
    with MemosClient(daemon.url, api_key=daemon.admin_key) as client:
        yield client


@pytest.fixture
def user(admin: MemosClient) -> User:
    return admin.create_user(_name("user"))


# The first activation loads the model in the shared daemon: on a busy host that takes longer
# than the SDK's default 30 s per request, and the test is not about speed.
SLOW_REQUEST_S = 300


@pytest.fixture
def client(daemon: Any, user: User) -> Iterator[MemosClient]:
    with MemosClient(daemon.url, api_key=user.api_key, timeout=SLOW_REQUEST_S) as c:
        yield c


@pytest.fixture
def cube(client: MemosClient) -> Cube:
    return client.create_cube(_name("cube"), description="test cube")


@pytest.fixture
def other(daemon: Any, admin: MemosClient) -> Iterator[tuple[User, MemosClient]]:
    """A second user, for tenancy."""
    someone = admin.create_user(_name("other"))
    with MemosClient(daemon.url, api_key=someone.api_key) as c:
        yield someone, c


# --------------------------------------------------------------------------- users, auth


def test_health(client: MemosClient) -> None:
    assert client.health().status == "ok"


def test_create_user_returns_a_working_key(daemon: Any, admin: MemosClient) -> None:
    name = _name("alice")
    user = admin.create_user(name)
    assert user.name == name
    assert user.id and user.api_key
    with MemosClient(daemon.url, api_key=user.api_key) as alice:
        assert alice.list_cubes() == []
        cube = alice.create_cube("mine")
    assert cube.owner_id == user.id


def test_auth_errors(daemon: Any, client: MemosClient) -> None:
    with MemosClient(daemon.url) as anonymous, pytest.raises(Unauthorized) as missing:
        anonymous.list_cubes()
    assert (missing.value.status, missing.value.code) == (401, "unauthorized")
    with MemosClient(daemon.url, api_key="msk_not-a-key") as wrong, pytest.raises(Unauthorized):
        wrong.list_cubes()
    with pytest.raises(Forbidden) as not_admin:
        client.create_user("mallory")
    assert (not_admin.value.status, not_admin.value.code) == (403, "forbidden")
    assert not_admin.value.message  # the server's sentence, not a placeholder


# --------------------------------------------------------------------------- cubes


def test_cube_lifecycle(client: MemosClient, user: User) -> None:
    cube = client.create_cube("notes", description="my notes")
    assert (cube.name, cube.description, cube.owner_id) == ("notes", "my notes", user.id)
    assert cube.created_at.tzinfo is not None
    assert [c.id for c in client.list_cubes()] == [cube.id]

    fetched = client.get_cube(cube.id)
    assert fetched.id == cube.id and fetched.stats is not None
    assert (fetched.stats.memories, fetched.stats.activations) == (0, 0)
    client.add_memories(cube.id, [{"content": "one"}, {"content": "two"}])
    stats = client.get_cube(cube.id).stats
    assert stats is not None and stats.memories == 2

    assert client.delete_cube(cube.id) is None
    with pytest.raises(NotFound) as gone:
        client.get_cube(cube.id)
    assert gone.value.status == 404
    assert client.list_cubes() == []


def test_list_cubes_follows_cursors(client: MemosClient) -> None:
    created = {client.create_cube(f"c{i}").id for i in range(53)}  # default page is 50
    listed = [c.id for c in client.list_cubes()]
    assert len(listed) == 53
    assert set(listed) == created


def test_tenancy_and_grants(
    client: MemosClient, cube: Cube, other: tuple[User, MemosClient]
) -> None:
    someone, their = other
    # Invisible until granted: 404, never 403.
    with pytest.raises(NotFound):
        their.get_cube(cube.id)
    assert their.list_cubes() == []

    grant = client.grant(cube.id, someone.id, "reader")
    assert (grant.cube_id, grant.user_id, grant.role) == (cube.id, someone.id, "reader")
    assert [c.id for c in their.list_cubes()] == [cube.id]
    memory = client.add_memory(cube.id, "the owner wrote this")
    assert their.get_memory(cube.id, memory.id).content == "the owner wrote this"
    with pytest.raises(Forbidden) as denied:
        their.add_memory(cube.id, "a reader may not write")
    assert denied.value.status == 403
    with pytest.raises(Forbidden):
        their.delete_cube(cube.id)

    client.grant(cube.id, someone.id, "writer")
    written = their.add_memory(cube.id, "a writer may")
    assert client.get_memory(cube.id, written.id).content == "a writer may"

    with pytest.raises(ValidationFailed) as bad_role:
        client.grant(cube.id, someone.id, "admin")
    assert bad_role.value.status == 422


def test_get_or_create_cube(
    client: MemosClient, user: User, other: tuple[User, MemosClient]
) -> None:
    made = client.get_or_create_cube("journal", description="first")
    assert (made.name, made.description, made.owner_id, made.role) == (
        "journal",
        "first",
        user.id,
        "owner",
    )
    again = client.get_or_create_cube("journal", description="ignored for an existing cube")
    assert (again.id, again.description) == (made.id, "first")
    assert [c.id for c in client.list_cubes()] == [made.id]

    # A cube of the same name that is only granted to this key is someone else's: never matched.
    someone, their = other
    theirs = their.create_cube("shared")
    their.grant(theirs.id, user.id, "writer")
    mine = client.get_or_create_cube("shared")
    assert mine.id != theirs.id and (mine.owner_id, mine.role) == (user.id, "owner")
    assert {(c.id, c.role) for c in client.list_cubes()} == {
        (made.id, "owner"),
        (theirs.id, "writer"),
        (mine.id, "owner"),
    }


class _LosesTheRace(MemosClient):
    """After its first lookup, another client (same key, real HTTP) creates the cube: the
    interleaving that makes `create_cube` answer 409 `cube_exists`."""

    def __init__(self, url: str, api_key: str, rival: MemosClient) -> None:
        super().__init__(url, api_key=api_key)
        self.rival, self.rival_cube, self.lookups = rival, None, 0

    def list_cubes(self) -> list[Cube]:
        cubes = super().list_cubes()
        self.lookups += 1
        if self.lookups == 1:
            self.rival_cube = self.rival.create_cube("raced", description="the rival's")
        return cubes


def test_get_or_create_cube_answers_cube_exists_by_fetching(
    daemon: Any, client: MemosClient, user: User
) -> None:
    assert user.api_key is not None
    with _LosesTheRace(daemon.url, user.api_key, client) as racer:
        cube = racer.get_or_create_cube("raced", description="mine")
        assert racer.rival_cube is not None and racer.lookups == 2
        assert (cube.id, cube.description) == (racer.rival_cube.id, "the rival's")
    assert [c.id for c in client.list_cubes()] == [cube.id]


def test_get_or_create_cube_other_errors_propagate(client: MemosClient) -> None:
    with pytest.raises(ValidationFailed):
        client.get_or_create_cube("")  # a 422 is not a race: raised as it is


def test_own_keys_create_list_revoke(daemon: Any, client: MemosClient, user: User) -> None:
    (initial,) = client.list_keys()
    assert (initial.prefix, initial.api_key, initial.revoked_at) == (user.api_key[:8], None, None)
    made = client.create_key("laptop")
    assert made.name == "laptop" and made.api_key and made.api_key.startswith("msk_")
    with MemosClient(daemon.url, api_key=made.api_key) as second:
        assert second.revoke_key(initial.id) is None
        with pytest.raises(Unauthorized):  # the revoked key, at once
            client.list_cubes()
        listed = second.list_keys()
        assert [(k.id, k.revoked_at is None) for k in listed] == [
            (initial.id, False),
            (made.id, True),
        ]
        assert all(k.api_key is None for k in listed)
        with pytest.raises(Conflict) as last:
            second.revoke_key(made.id)
        assert last.value.code == "last_key"
        with pytest.raises(NotFound) as missing:
            second.revoke_key("key_999999999")
        assert missing.value.code == "key_not_found"


def test_admin_lists_users(admin: MemosClient, client: MemosClient, user: User) -> None:
    users = {u.id: u for u in admin.list_users()}
    assert (users[user.id].name, users[user.id].is_admin) == (user.name, False)
    assert users["usr_admin"].is_admin is True and users[user.id].api_key is None
    with pytest.raises(Forbidden):
        client.list_users()


def test_owner_lists_and_revokes_grants(
    client: MemosClient, cube: Cube, other: tuple[User, MemosClient]
) -> None:
    someone, their = other
    client.grant(cube.id, someone.id, "writer")
    (grant,) = client.list_grants(cube.id)
    assert (grant.cube_id, grant.user_id, grant.role) == (cube.id, someone.id, "writer")
    assert grant.created_at is not None
    assert their.get_cube(cube.id).id == cube.id
    assert client.revoke_grant(cube.id, someone.id) is None
    with pytest.raises(NotFound):
        their.get_cube(cube.id)
    assert client.list_grants(cube.id) == []
    with pytest.raises(NotFound) as again:
        client.revoke_grant(cube.id, someone.id)
    assert again.value.code == "grant_not_found"


# --------------------------------------------------------------------------- memories


def test_add_memories_round_trip(client: MemosClient, cube: Cube) -> None:
    items: list[MemoryInput | dict[str, Any]] = [
        {
            "content": "Caroline went to the LGBTQ support group",
            "session_id": "session_1",
            "speaker": "Caroline",
            "timestamp": datetime(2023, 5, 8, 13, 56),  # naive: UTC
            "metadata": {"dia_id": "D1:3", "n": 1},
        },
        MemoryInput(
            content="Melanie painted a sunrise",
            speaker="Melanie",
            timestamp=datetime(2023, 5, 8, 15, 56, tzinfo=timezone(timedelta(hours=2))),
        ),
        {"content": "no timestamp given", "timestamp": "2022-01-02T03:04:05"},
    ]
    stored = client.add_memories(cube.id, items)
    assert [m.content for m in stored] == [
        "Caroline went to the LGBTQ support group",
        "Melanie painted a sunrise",
        "no timestamp given",
    ]
    assert len({m.id for m in stored}) == 3
    first, second, third = stored
    assert (first.session_id, first.speaker, first.metadata) == (
        "session_1",
        "Caroline",
        {"dia_id": "D1:3", "n": 1},
    )
    assert first.timestamp == datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    assert second.timestamp == datetime(2023, 5, 8, 13, 56, tzinfo=UTC)  # same instant
    assert third.timestamp == datetime(2022, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (second.session_id, second.metadata) == (None, {})
    assert all(m.version == 1 and m.cube_id == cube.id for m in stored)
    for m in stored:
        assert client.get_memory(cube.id, m.id) == m


def test_add_memory_defaults_timestamp_to_now(client: MemosClient, cube: Cube) -> None:
    before = datetime.now(UTC)
    memory = client.add_memory(cube.id, "just now", speaker="me")
    after = datetime.now(UTC)
    assert memory.speaker == "me"
    assert before - timedelta(seconds=5) <= memory.timestamp <= after + timedelta(seconds=5)


def test_batches_are_atomic(client: MemosClient, cube: Cube) -> None:
    with pytest.raises(PayloadTooLarge) as too_many:
        client.add_memories(cube.id, [{"content": f"m{i}"} for i in range(1001)])
    assert (too_many.value.status, too_many.value.code) == (413, "payload_too_large")
    with pytest.raises(ValidationFailed) as invalid:
        client.add_memories(
            cube.id, [{"content": "fine"}, {"content": "bad", "speaker": "x" * 300}]
        )
    assert invalid.value.status == 422
    assert "items[1].speaker" in invalid.value.message
    assert client.list_memories(cube.id).items == []
    assert len(client.add_memories(cube.id, [{"content": f"m{i}"} for i in range(1000)])) == 1000


def test_pagination_follows_next_cursor(client: MemosClient, cube: Cube) -> None:
    items = [{"content": f"memory {i}", "session_id": f"s{i % 3}"} for i in range(120)]
    ids = [m.id for m in client.add_memories(cube.id, items)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = client.list_memories(cube.id, limit=50, cursor=cursor)
        pages += 1
        assert len(page.items) == (50 if pages < 3 else 20)
        seen += [m.id for m in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages == 3
    assert seen == ids  # every memory once, in insertion order

    assert [m.id for m in client.iter_memories(cube.id)] == ids
    assert [m.id for m in client.iter_memories(cube.id, session_id="s1")] == ids[1::3]
    page = client.list_memories(cube.id, session_id="s2", limit=500)
    assert ([m.id for m in page.items], page.next_cursor) == (ids[2::3], None)

    with pytest.raises(ValidationFailed) as bad_cursor:
        client.list_memories(cube.id, cursor="not-a-cursor")
    assert bad_cursor.value.code == "invalid_cursor"


def test_update_delete_and_history(client: MemosClient, cube: Cube) -> None:
    memory = client.add_memory(cube.id, "I live in Paris", metadata={"city": "paris"})
    updated = client.update_memory(cube.id, memory.id, content="I live in Lyon")
    assert (updated.id, updated.version, updated.content) == (memory.id, 2, "I live in Lyon")
    assert updated.metadata == {"city": "paris"}
    assert updated.updated_at >= memory.updated_at
    again = client.update_memory(cube.id, memory.id, metadata={"city": "lyon"})
    assert (again.version, again.content, again.metadata) == (3, "I live in Lyon", {"city": "lyon"})

    history = client.memory_history(cube.id, memory.id)
    assert [(h.version, h.content) for h in history] == [
        (1, "I live in Paris"),
        (2, "I live in Lyon"),
        (3, "I live in Lyon"),
    ]

    assert client.delete_memory(cube.id, memory.id) is None
    with pytest.raises(NotFound) as gone:
        client.get_memory(cube.id, memory.id)
    assert (gone.value.status, gone.value.code) == (404, "memory_not_found")
    assert client.list_memories(cube.id).items == []
    assert client.search(cube.id, "Lyon").hits == []
    # Soft delete: the history survives.
    assert [h.version for h in client.memory_history(cube.id, memory.id)][:3] == [1, 2, 3]


def test_if_match_and_erase(client: MemosClient, cube: Cube) -> None:
    memory = client.add_memory(cube.id, "the spare key is under the mat")
    updated = client.update_memory(cube.id, memory.id, content="it moved", if_match=memory.version)
    assert updated.version == 2
    with pytest.raises(PreconditionFailed) as stale:
        client.update_memory(cube.id, memory.id, content="lost update", if_match=memory.version)
    assert (stale.value.status, stale.value.code) == (412, "precondition_failed")
    with pytest.raises(PreconditionFailed):
        client.delete_memory(cube.id, memory.id, erase=True, if_match=1)
    assert client.get_memory(cube.id, memory.id).content == "it moved"
    assert client.update_memory(cube.id, memory.id, metadata={}, if_match="*").version == 3
    assert client.delete_memory(cube.id, memory.id, erase=True, if_match=3) is None
    with pytest.raises(NotFound):
        client.memory_history(cube.id, memory.id)  # erased: no history either
    assert client.search(cube.id, "spare key under the mat").hits == []


def test_search(client: MemosClient, cube: Cube) -> None:
    stored = client.add_memories(
        cube.id,
        [
            {"content": "Bob plays the cello in an orchestra", "session_id": "a",
             "timestamp": datetime(2023, 1, 1), "metadata": {"topic": "music"}},
            {"content": "Alice adopted a golden retriever puppy", "session_id": "a",
             "timestamp": datetime(2023, 6, 1), "metadata": {"topic": "pets"}},
            {"content": "Carol is training for the Berlin marathon", "session_id": "b",
             "timestamp": datetime(2024, 1, 1), "metadata": {"topic": "sport"}},
        ],
    )  # fmt: skip
    cello, puppy, marathon = (m.id for m in stored)

    result = client.search(cube.id, "who plays the cello?", top_k=3)
    assert result.hits[0].memory.id == cello
    assert result.hits[0].memory == stored[0]
    assert result.took_ms >= 0
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)

    assert [h.memory.id for h in client.search(cube.id, "cello", top_k=1).hits] == [cello]
    # The filter wins over relevance: the marathon memory is in session "b".
    only_a = {h.memory.id for h in client.search(cube.id, "marathon", session_id="a").hits}
    assert only_a == {cello, puppy}

    # Naive bounds are UTC; strings are accepted too.
    window = client.search(
        cube.id, "anything", since=datetime(2023, 3, 1), until="2023-12-31T00:00"
    )
    assert [h.memory.id for h in window.hits] == [puppy]
    tagged = client.search(cube.id, "anything", metadata={"topic": "sport"})
    assert [h.memory.id for h in tagged.hits] == [marathon]

    with pytest.raises(ValidationFailed):
        client.search(cube.id, "")


def test_missing_things_are_not_found(client: MemosClient, cube: Cube) -> None:
    with pytest.raises(NotFound) as no_memory:
        client.get_memory(cube.id, "mem_doesnotexist")
    assert no_memory.value.code == "memory_not_found"
    with pytest.raises(NotFound) as no_cube:
        client.list_memories("cube_doesnotexist")
    assert no_cube.value.code == "cube_not_found"
    # Ids are path-quoted: a slash cannot reach another route.
    with pytest.raises(NotFound):
        client.get_memory(cube.id, "../../../healthz")


# --------------------------------------------------------------------------- jobs


def test_jobs(admin: MemosClient, client: MemosClient) -> None:
    jobs = {job.name: job for job in admin.list_jobs()}
    assert "index_maintenance" in jobs
    run = admin.run_job("index_maintenance")
    assert run.run_id
    assert admin.get_job_run(run.run_id).run_id == run.run_id
    with pytest.raises(NotFound) as unknown:
        admin.run_job("no_such_job")
    assert unknown.value.status == 404
    with pytest.raises(Forbidden):
        client.list_jobs()
    with pytest.raises(Forbidden):
        client.run_job("index_maintenance")


def test_policy_and_a_job_on_one_cube(admin: MemosClient, client: MemosClient, cube: Cube) -> None:
    assert client.get_policy(cube.id).version == 0
    policy = client.set_policy(cube.id, memory_ttl_days=90, fuse={"enabled": True})
    assert (policy.version, policy.memory_ttl_days, policy.fuse.enabled) == (1, 90.0, True)
    assert policy.overrides == ["memory_ttl_days", "fuse"]
    with pytest.raises(ValidationFailed):
        client.set_policy(cube.id, eviction="fifo")
    run = admin.run_job("fuse", cube_id=cube.id)
    deadline = time.time() + 120
    while (done := admin.get_job_run(run.run_id)).status == "running":
        assert time.time() < deadline
        time.sleep(0.05)
    assert done.status == "ok" and done.result["cube_id"] == cube.id
    assert (done.result["cubes"], done.result["groups"]) == (1, 0)


# --------------------------------------------------------------------------- activations


@pytest.fixture
def activations_served(daemon: Any) -> None:
    paths = httpx.get(f"{daemon.url}/openapi.json").json()["paths"]
    if "/v1/cubes/{cube_id}/activations" not in paths:
        pytest.skip("this daemon does not serve the activation routes yet")


@pytest.mark.usefixtures("activations_served")
def test_activation_lifecycle(client: MemosClient, cube: Cube) -> None:
    text = "Caroline is a counselor. Melanie paints sunrises and has two kids."
    act = client.create_activation(cube.id, text=text)
    assert act.cube_id == cube.id
    assert act.tokens > 0 and 0 < act.kept_tokens <= act.tokens
    assert act.bits == 16 and act.bytes > 0
    assert [a.id for a in client.list_activations(cube.id)] == [act.id]
    assert client.get_activation(cube.id, act.id).id == act.id
    stats = client.get_cube(cube.id).stats
    assert stats is not None and stats.activations == 1

    gen = client.generate(cube.id, "What does Melanie paint?", activation_id=act.id, max_tokens=4)
    assert gen.activation_id == act.id
    assert gen.reused_tokens == act.kept_tokens
    assert gen.prompt_tokens > 0 and gen.ttft_ms > 0

    parts = list(client.generate_stream(cube.id, "What does Melanie paint?", act.id, 4))
    *pieces, final = parts
    assert isinstance(final, Generation) and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == final.text == gen.text and final.reused_tokens == act.kept_tokens

    small = client.create_activation(cube.id, text=text, bits=4, budget_tokens=8)
    assert small.bits == 4 and small.kept_tokens <= 8 and small.bytes < act.bytes
    assert (act.scorer, small.scorer) == (None, "kvzip")
    recent = client.create_activation(cube.id, text=text, budget_tokens=8, scorer="recent")
    assert recent.scorer == "recent" and recent.kept_tokens <= 8

    assert client.delete_activation(cube.id, act.id) is None
    with pytest.raises(NotFound):
        client.get_activation(cube.id, act.id)


@pytest.mark.usefixtures("activations_served")
def test_activation_from_memories(client: MemosClient, cube: Cube) -> None:
    ids = [m.id for m in client.add_memories(cube.id, [{"content": "a"}, {"content": "b"}])]
    by_ids = client.create_activation(cube.id, memory_ids=ids)
    assert by_ids.tokens > 0
    client.add_memory(cube.id, "in a session", session_id="s1")
    by_session = client.create_activation(cube.id, session_id="s1", bits=8)
    assert by_session.bits == 8 and by_session.episodes is None


@pytest.mark.usefixtures("activations_served")
def test_an_episodic_activation_from_sessions(client: MemosClient, cube: Cube) -> None:
    talk = {
        "hike": ["We hiked the ridge trail to the summit.", "The glacier below the pass shone."],
        "bake": ["I baked sourdough bread with rye.", "The crust came out of the oven dark."],
    }
    for session, lines in talk.items():
        client.add_memories(cube.id, [{"content": c, "speaker": "Ana", "session_id": session}
                                      for c in lines * 4])  # fmt: skip
    episodic = {"episodes": 2, "budget_tokens": 64, "block_tokens": 64}
    act = client.create_activation(cube.id, session_ids=["hike", "bake"], episodic=episodic)
    assert act.state == "building" and act.episodes == []
    act = client.wait_activation(cube.id, act.id)
    assert act.state == "ready" and act.episodes is not None
    assert [e.windows for e in act.episodes] == [[0, 1], [2, 3]]  # 4 utterances a window
    gen = client.generate(cube.id, "Which trail did Ana hike?", activation_id=act.id, max_tokens=2)
    assert gen.episode == 0 and gen.reused_tokens == act.episodes[0].kept_tokens


# --------------------------------------------------------------------------- errors, transport


def _response(
    status: int, body: Any = None, text: str | None = None, headers: Any = None
) -> httpx.Response:
    if text is not None:
        return httpx.Response(status, text=text, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


def test_too_many_requests_are_typed() -> None:
    limited = error_from_response(
        _response(
            429,
            {"error": {"code": "rate_limited", "message": "slow"}},
            headers={"Retry-After": "3"},
        )
    )
    assert type(limited) is RateLimited and isinstance(limited, TooManyRequests)
    assert (limited.status, limited.code, limited.retry_after, limited.limit) == (
        429, "rate_limited", 3.0, None,
    )  # fmt: skip
    body = {"error": {"code": "quota_exceeded", "message": "full", "limit": "max_cubes_per_user"}}
    quota = error_from_response(_response(429, body))
    assert type(quota) is QuotaExceeded
    assert (quota.retry_after, quota.limit) == (None, "max_cubes_per_user")
    other = error_from_response(
        _response(429, {"error": {"code": "too_many_builds", "message": "x"}})
    )
    assert type(other) is TooManyRequests and other.code == "too_many_builds"


@pytest.mark.parametrize(
    ("status", "body", "cls", "code", "message"),
    [
        (400, {"error": {"code": "malformed_json", "message": "not JSON"}}, BadRequest,
         "malformed_json", "not JSON"),
        (409, {"error": {"code": "activation_mismatch", "message": "other model"}},
         ActivationMismatch, "activation_mismatch", "other model"),
        (409, {"error": {"code": "name_taken", "message": "taken"}}, Conflict, "name_taken",
         "taken"),
        (404, {"detail": "Not Found"}, NotFound, "not_found", "Not Found"),
        (422, {"detail": [{"loc": ["body"], "msg": "bad"}]}, ValidationFailed,
         "validation_failed", '[{"loc": ["body"], "msg": "bad"}]'),
        (503, None, ServerError, "server_error", "Service Unavailable"),
        (418, {"error": "teapot"}, MemosError, "http_418", "teapot"),
    ],
)  # fmt: skip
def test_error_parsing(
    status: int, body: Any, cls: type[MemosError], code: str, message: str
) -> None:
    err = error_from_response(_response(status, body))
    assert type(err) is cls
    assert (err.status, err.code, err.message) == (status, code, message)


def test_a_429_carries_its_retry_after() -> None:
    body = {"error": {"code": "too_many_builds", "message": "too many builds are queued"}}
    response = httpx.Response(429, json=body, headers={"Retry-After": "10"})
    err = error_from_response(response)
    assert type(err) is TooManyRequests
    assert (err.status, err.code, err.retry_after) == (429, "too_many_builds", 10.0)


def test_error_parsing_plain_text() -> None:
    err = error_from_response(_response(502, text="upstream timed out\n"))
    assert type(err) is ServerError
    assert (err.status, err.code, err.message) == (502, "server_error", "upstream timed out")
    assert issubclass(ActivationMismatch, Conflict)


def test_validation_details_are_kept(client: MemosClient, cube: Cube) -> None:
    with pytest.raises(ValidationFailed) as exc:
        client.add_memories(cube.id, [{"content": "x", "surprise": 1}])
    assert (exc.value.status, exc.value.code) == (422, "validation_error")
    assert "items[0].surprise" in exc.value.message
    # Whatever else the server put in the error body is passed through.
    assert [d["field"] for d in exc.value.details] == ["items[0].surprise"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_error_names_the_url() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with MemosClient(url, timeout=2) as client, pytest.raises(MemosConnectionError) as exc:
        client.health()
    assert f"{url}/healthz" in str(exc.value)
    assert exc.value.status is None and exc.value.code == "connection_error"
    assert isinstance(exc.value, MemosError)


def test_models_accept_unknown_fields() -> None:
    memory = Memory.model_validate(
        {
            "id": "m1",
            "cube_id": "c1",
            "content": "x",
            "timestamp": "2024-01-01T00:00:00Z",
            "version": 1,
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z",
            "importance": 0.7,
        }
    )
    assert memory.model_extra == {"importance": 0.7}
    assert "importance" in memory.model_dump()


# --------------------------------------------------------------------------- async


@pytest.fixture
async def aclient(daemon: Any, user: User) -> AsyncIterator[AsyncMemosClient]:
    async with AsyncMemosClient(daemon.url, api_key=user.api_key, timeout=SLOW_REQUEST_S) as c:
        yield c


async def test_async_client(aclient: AsyncMemosClient, client: MemosClient, user: User) -> None:
    assert (await aclient.health()).status == "ok"
    cube = await aclient.create_cube("async", description="via asyncio")
    assert cube.owner_id == user.id
    assert [c.id for c in await aclient.list_cubes()] == [cube.id]

    items = [{"content": f"async memory {i}", "session_id": "s"} for i in range(7)]
    stored = await aclient.add_memories(cube.id, items)
    one = await aclient.add_memory(cube.id, "the cello is in the attic", speaker="Bob")
    ids = [m.id for m in stored] + [one.id]
    assert [m.id async for m in aclient.iter_memories(cube.id)] == ids
    assert [m.id async for m in aclient.iter_memories(cube.id, session_id="s")] == ids[:7]
    assert client.get_memory(cube.id, one.id) == one  # same data through the sync client

    page = await aclient.list_memories(cube.id, limit=5)
    assert len(page.items) == 5 and page.next_cursor is not None
    updated = await aclient.update_memory(cube.id, one.id, content="the cello is in the car")
    assert updated.version == 2
    with pytest.raises(PreconditionFailed):
        await aclient.update_memory(cube.id, one.id, content="stale", if_match=1)
    assert [h.version for h in await aclient.memory_history(cube.id, one.id)] == [1, 2]
    assert [k.prefix for k in await aclient.list_keys()] == [user.api_key[:8]]
    key = await aclient.create_key("async")
    assert key.api_key and [k.id for k in await aclient.list_keys()][-1] == key.id
    assert await aclient.revoke_key(key.id) is None
    assert await aclient.list_grants(cube.id) == []
    hits = (await aclient.search(cube.id, "where is the cello?", top_k=1)).hits
    assert [h.memory.id for h in hits] == [one.id]
    await aclient.delete_memory(cube.id, one.id)
    with pytest.raises(NotFound):
        await aclient.get_memory(cube.id, one.id)
    with pytest.raises(Forbidden):
        await aclient.list_jobs()
    act = await aclient.create_activation(cube.id, text="The cello is in the car.", bits=8)
    assert (await aclient.wait_activation(cube.id, act.id)).state == "ready"
    parts = [p async for p in aclient.generate_stream(cube.id, "Where is the cello?", act.id, 3)]
    *pieces, final = parts
    assert isinstance(final, Generation) and "".join(str(p) for p in pieces) == final.text
    with pytest.raises(NotFound):
        [p async for p in aclient.generate_stream(cube.id, "hi", "act_nope")]
    await aclient.delete_cube(cube.id)
    assert await aclient.list_cubes() == []


async def test_async_get_or_create_cube(
    aclient: AsyncMemosClient, client: MemosClient, user: User
) -> None:
    # Eight concurrent calls for one name: each lookup can miss the others' create, so the
    # losers get 409 `cube_exists` and fetch; all end with the one cube.
    cubes = await asyncio.gather(*(aclient.get_or_create_cube("inbox") for _ in range(8)))
    assert len({c.id for c in cubes}) == 1
    (only,) = client.list_cubes()
    assert (only.id, only.name, only.owner_id) == (cubes[0].id, "inbox", user.id)
    assert (await aclient.get_or_create_cube("inbox", description="x")).id == only.id
    other = await aclient.get_or_create_cube("outbox", description="new")
    assert (other.name, other.description) == ("outbox", "new") and other.id != only.id


async def test_async_connection_error() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    async with AsyncMemosClient(url, timeout=2) as client:
        with pytest.raises(MemosConnectionError, match=url):
            await client.get_cube("c1")
