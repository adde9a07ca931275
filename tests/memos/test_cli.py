"""The `memos` CLI against a real daemon, run through typer's CliRunner and checked with the SDK.

Each test makes its own user and cube; only the daemon is shared. `memos serve` is tested by
starting a second, real daemon in a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from memos.cli import app
from memos.client import Cube, MemosClient, NotFound, User
from memos.locomo import load_locomo

ROOT = Path(__file__).resolve().parents[2]
LOCOMO_FILE = Path(
    os.environ.get(
        "MEMOS_LOCOMO_FILE", ROOT.parent / "shared" / "data" / "locomo" / "locomo_dev.json"
    )
)
INPUT_FIELDS = ("content", "session_id", "speaker", "timestamp", "metadata")


@pytest.fixture
def user(daemon: Any) -> User:
    with MemosClient(daemon.url, api_key=daemon.admin_key) as admin:
        return admin.create_user(f"cli-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def client(daemon: Any, user: User) -> Iterator[MemosClient]:
    with MemosClient(daemon.url, api_key=user.api_key) as c:
        yield c


@pytest.fixture
def cube(client: MemosClient) -> Cube:
    return client.create_cube("cli-cube")


@pytest.fixture
def memos(daemon: Any, user: User) -> Any:
    """`memos(*args)` runs the CLI as `user` against the shared daemon."""
    runner = CliRunner()

    def run(*args: str, env: dict[str, str | None] | None = None) -> Any:
        base: dict[str, str | None] = {
            "MEMOS_URL": daemon.url,
            "MEMOS_API_KEY": user.api_key,
            "MEMOS_DATA_DIR": str(daemon.data_dir),
        }
        return runner.invoke(app, list(args), env={**base, **(env or {})})

    return run


def _ok(result: Any) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return str(result.stdout)


def _fields(line: str) -> dict[str, str]:
    return dict(part.split(": ", 1) for part in line.strip().splitlines())


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- users, cubes


def test_user_create_uses_the_admin_key_file(memos: Any, daemon: Any, tmp_path: Path) -> None:
    # No MEMOS_API_KEY: the CLI falls back to <MEMOS_DATA_DIR>/admin.key, as a daemon writes it.
    (tmp_path / "admin.key").write_text(daemon.admin_key + "\n")
    env = {"MEMOS_API_KEY": None, "MEMOS_DATA_DIR": str(tmp_path)}
    out = _fields(_ok(memos("user", "create", "dora", env=env)))
    assert set(out) == {"id", "api_key"}
    with MemosClient(daemon.url, api_key=out["api_key"]) as dora:
        cube = dora.create_cube("dora's")
    assert cube.owner_id == out["id"]


def test_user_create_needs_admin(memos: Any) -> None:
    result = memos("user", "create", "eve")
    assert result.exit_code == 1
    assert result.stderr == "error: forbidden: this route is for the admin key only\n"
    assert "Traceback" not in result.stdout + result.stderr


def test_global_options_override_env(memos: Any, daemon: Any, user: User) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = memos("--url", dead, "cube", "list")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: connection_error: cannot reach {dead}/v1/cubes")
    bad_key = memos("--api-key", "msk_wrong", "cube", "list")
    assert (bad_key.exit_code, bad_key.stderr) == (
        1,
        "error: unauthorized: unknown or revoked API key\n",
    )


def test_cube_create_and_list(memos: Any, client: MemosClient, user: User) -> None:
    created = _fields(_ok(memos("cube", "create", "diary", "--description", "dear diary")))
    cube = client.get_cube(created["id"])
    assert (cube.name, cube.description, cube.owner_id) == ("diary", "dear diary", user.id)

    table = _ok(memos("cube", "list")).splitlines()
    assert table[0].split() == ["ID", "NAME", "CREATED", "DESCRIPTION"]
    assert len(table) == 2 and table[1].split()[:2] == [cube.id, "diary"]
    listed = json.loads(_ok(memos("cube", "list", "--json")))
    assert [(c["id"], c["name"]) for c in listed] == [(cube.id, "diary")]


def test_key_create_list_revoke(memos: Any, daemon: Any, user: User) -> None:
    made = _fields(_ok(memos("key", "create", "--name", "ci")))
    assert set(made) == {"id", "api_key"} and made["api_key"].startswith("msk_")
    table = _ok(memos("key", "list")).splitlines()
    assert table[0].split() == ["ID", "NAME", "PREFIX", "CREATED", "REVOKED"]
    assert [line.split()[1] for line in table[1:]] == ["initial", "ci"]
    listed = json.loads(_ok(memos("key", "list", "--json")))
    initial = listed[0]["id"]
    assert [k["name"] for k in listed] == ["initial", "ci"]
    assert all(k["api_key"] is None for k in listed)  # never a secret in a list
    env = {"MEMOS_API_KEY": made["api_key"]}
    assert _ok(memos("key", "revoke", initial, env=env)) == f"revoked: {initial}\n"
    refused = memos("key", "list")  # as the revoked key
    assert (refused.exit_code, refused.stderr) == (
        1,
        "error: unauthorized: unknown or revoked API key\n",
    )
    last = memos("key", "revoke", made["id"], env=env)
    assert last.exit_code == 1 and last.stderr.startswith("error: last_key: ")


def test_user_list_needs_admin(memos: Any, daemon: Any, user: User) -> None:
    table = _ok(memos("user", "list", env={"MEMOS_API_KEY": daemon.admin_key})).splitlines()
    assert table[0].split() == ["ID", "NAME", "ADMIN", "CREATED"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["usr_admin"][1:3] == ["admin", "yes"]
    assert rows[user.id][1] == user.name and len(rows[user.id]) == 3  # not admin: blank
    refused = memos("user", "list")
    assert refused.exit_code == 1 and refused.stderr.startswith("error: forbidden: ")


def test_cube_grants_and_revoke(memos: Any, daemon: Any, client: MemosClient, cube: Cube) -> None:
    with MemosClient(daemon.url, api_key=daemon.admin_key) as admin:
        friend = admin.create_user(f"friend-{uuid.uuid4().hex[:6]}")
    client.grant(cube.id, friend.id, "reader")
    table = _ok(memos("cube", "grants", cube.id)).splitlines()
    assert table[0].split() == ["USER", "ROLE", "SINCE"]
    assert [line.split()[:2] for line in table[1:]] == [[friend.id, "reader"]]
    assert (
        _ok(memos("cube", "revoke", cube.id, friend.id)) == f"revoked: {friend.id} on {cube.id}\n"
    )
    with MemosClient(daemon.url, api_key=friend.api_key) as theirs, pytest.raises(NotFound):
        theirs.get_cube(cube.id)
    again = memos("cube", "revoke", cube.id, friend.id)
    assert again.exit_code == 1 and again.stderr.startswith("error: grant_not_found: ")
    assert json.loads(_ok(memos("cube", "grants", cube.id, "--json"))) == []


# --------------------------------------------------------------------------- add, search


def test_add(memos: Any, client: MemosClient, cube: Cube) -> None:
    out = _fields(
        _ok(
            memos(
                "add", cube.id, "Melanie ran a charity race",
                "--session-id", "session_2", "--speaker", "Melanie",
                "--timestamp", "2023-05-25T13:14:00",
                "--metadata", '{"dia_id": "D2:1"}',
            )
        )
    )  # fmt: skip
    memory = client.get_memory(cube.id, out["id"])
    assert (memory.content, memory.session_id, memory.speaker, memory.metadata) == (
        "Melanie ran a charity race",
        "session_2",
        "Melanie",
        {"dia_id": "D2:1"},
    )
    assert memory.timestamp == datetime(2023, 5, 25, 13, 14, tzinfo=UTC)

    as_json = json.loads(_ok(memos("add", cube.id, "second", "--json")))
    assert client.get_memory(cube.id, as_json["id"]).version == as_json["version"] == 1


def test_activation_commands_and_generate(memos: Any, client: MemosClient, cube: Cube) -> None:
    made = json.loads(
        _ok(memos("activation", "create", cube.id, "--text", "Melanie paints sunrises.",
                  "--bits", "8", "--json"))
    )  # fmt: skip
    assert (made["state"], made["bits"]) == ("ready", 8)
    assert client.get_activation(cube.id, made["id"]).kept_tokens == made["kept_tokens"]
    listed = _ok(memos("activation", "list", cube.id))
    assert made["id"] in listed and "ready" in listed
    result = memos("generate", cube.id, "What does Melanie paint?", "--activation", made["id"],
                   "--max-tokens", "3")  # fmt: skip
    assert result.exit_code == 0 and f"reused {made['kept_tokens']}" in result.stderr
    answer = json.loads(_ok(memos("generate", cube.id, "Hi", "--max-tokens", "2", "--json")))
    assert answer["reused_tokens"] == 0 and answer["activation_id"] is None
    assert f"deleted {made['id']}" in _ok(memos("activation", "delete", cube.id, made["id"]))
    assert client.list_activations(cube.id) == []
    missing = memos("activation", "get", cube.id, made["id"])
    assert missing.exit_code != 0 and "activation_not_found" in missing.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--metadata", "{not json"], "not JSON"),
        (["--metadata", "[1, 2]"], "must be a JSON object"),
        (["--timestamp", "last tuesday"], "not an ISO 8601 datetime"),
    ],
)
def test_add_rejects_bad_options(
    memos: Any, client: MemosClient, cube: Cube, args: list[str], complaint: str
) -> None:
    result = memos("add", cube.id, "x", *args)
    assert result.exit_code == 2
    assert complaint in result.stderr
    assert client.list_memories(cube.id).items == []


def test_search(memos: Any, client: MemosClient, cube: Cube) -> None:
    cello, puppy = client.add_memories(
        cube.id,
        [
            {"content": "Bob plays the cello", "session_id": "a", "speaker": "Bob",
             "timestamp": "2023-01-01T10:00:00Z"},
            {"content": "Alice adopted a puppy", "session_id": "b", "speaker": "Alice",
             "timestamp": "2023-06-01T10:00:00Z"},
        ],
    )  # fmt: skip
    result = memos("search", cube.id, "who plays the cello?", "--top-k", "1")
    table = _ok(result).splitlines()
    assert table[0].split() == ["SCORE", "ID", "TIMESTAMP", "SPEAKER", "CONTENT"]
    assert len(table) == 2
    assert table[1].split()[1:] == [
        cello.id,
        "2023-01-01T10:00+00:00",
        "Bob",
        "Bob",
        "plays",
        "the",
        "cello",
    ]
    assert result.stderr.startswith("1 hits in ")

    found = json.loads(_ok(memos("search", cube.id, "cello", "--json")))
    assert {h["memory"]["id"] for h in found["hits"]} == {cello.id, puppy.id}
    assert found["hits"][0]["memory"]["id"] == cello.id

    def ids(*args: str) -> list[str]:
        out = json.loads(_ok(memos("search", cube.id, "cello", "--json", *args)))
        return [h["memory"]["id"] for h in out["hits"]]

    assert ids("--session-id", "b") == [puppy.id]
    assert ids("--since", "2023-03-01") == [puppy.id]
    assert ids("--until", "2023-03-01T00:00:00+00:00") == [cello.id]

    missing = memos("search", "cube_nope", "x")
    assert (missing.exit_code, missing.stderr) == (
        1,
        "error: cube_not_found: cube 'cube_nope' not found\n",
    )


# --------------------------------------------------------------------------- import, export


def test_import_jsonl_in_batches(
    memos: Any, client: MemosClient, cube: Cube, tmp_path: Path
) -> None:
    lines = [
        {"content": f"fact {i}", "session_id": f"s{i % 2}", "speaker": "A",
         "timestamp": f"2023-01-01T00:{i % 60:02d}:00Z", "metadata": {"i": i}}
        for i in range(600)
    ]  # fmt: skip
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    result = memos("import", cube.id, str(path), "--batch-size", "256")
    assert _ok(result) == f"imported 600 memories into {cube.id}\n"
    assert "600/600" in result.stderr  # the progress bar finished

    stored = list(client.iter_memories(cube.id))
    assert [m.content for m in stored] == [f"fact {i}" for i in range(600)]
    assert [m.metadata for m in stored] == [{"i": i} for i in range(600)]
    assert stored[61].timestamp == datetime(2023, 1, 1, 0, 1, tzinfo=UTC)
    assert stored[61].session_id == "s1"


@pytest.mark.parametrize(
    ("bad_line", "complaint"),
    [
        ("{not json", "in.jsonl:3: "),
        ('["a list"]', "in.jsonl:3: expected a JSON object, got list"),
        ('{"speaker": "no content"}', "in.jsonl:3: content: Field required"),
        ('{"content": "x", "timestamp": "soon"}', "in.jsonl:3: timestamp: "),
    ],
)
def test_import_reports_the_bad_line_before_sending(
    memos: Any, client: MemosClient, cube: Cube, tmp_path: Path, bad_line: str, complaint: str
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(f'{{"content": "one"}}\n{{"content": "two"}}\n{bad_line}\n{{"content": "4"}}\n')
    result = memos("import", cube.id, str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: invalid_input: ")
    assert complaint in result.stderr
    assert client.list_memories(cube.id).items == []  # nothing was sent


def test_import_arguments(memos: Any, cube: Cube, tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("[]")
    assert memos("import", cube.id).exit_code == 2
    assert memos("import", "--locomo", str(path), cube.id).exit_code == 2
    assert memos("import", cube.id, str(tmp_path / "absent.jsonl")).exit_code == 2
    assert memos("import", cube.id, str(path), "--batch-size", "1001").exit_code == 2


def test_export_import_round_trip(
    memos: Any, client: MemosClient, cube: Cube, tmp_path: Path
) -> None:
    # 520 memories: more than one page of the export's 500, so cursors are followed.
    items = [
        {"content": f"memory {i}", "session_id": f"s{i % 4}" if i % 5 else None,
         "speaker": ["Ann", "Ben", None][i % 3], "timestamp": f"2022-0{1 + i % 9}-11T08:30:00Z",
         "metadata": {"i": i, "tags": ["x", i % 2]} if i % 7 else {}}
        for i in range(520)
    ]  # fmt: skip
    client.add_memories(cube.id, items)
    client.update_memory(cube.id, client.list_memories(cube.id).items[0].id, content="edited")

    exported = tmp_path / "a.jsonl"
    result = memos("export", cube.id, "-o", str(exported))
    assert _ok(result) == ""
    assert result.stderr == f"exported 520 memories to {exported}\n"
    assert not (tmp_path / "a.jsonl.part").exists()
    original = _jsonl(exported)
    assert [m["id"] for m in original] == [m.id for m in client.iter_memories(cube.id)]
    assert original[0]["content"] == "edited" and original[0]["version"] == 2

    copy = client.create_cube("copy")
    _ok(memos("import", copy.id, str(exported)))
    copied = [json.loads(line) for line in _ok(memos("export", copy.id)).splitlines()]
    assert len(copied) == 520
    assert [{k: m[k] for k in INPUT_FIELDS} for m in copied] == [
        {k: m[k] for k in INPUT_FIELDS} for m in original
    ]
    assert {m["cube_id"] for m in copied} == {copy.id}
    assert not {m["id"] for m in copied} & {m["id"] for m in original}


def test_export_unknown_cube_leaves_no_file(memos: Any, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    result = memos("export", "cube_nope", "-o", str(out))
    assert (result.exit_code, result.stderr) == (
        1,
        "error: cube_not_found: cube 'cube_nope' not found\n",
    )
    assert list(tmp_path.iterdir()) == []


def _locomo_sample(sample_id: str, a: str, b: str) -> dict[str, Any]:
    return {
        "sample_id": sample_id,
        "conversation": {
            "speaker_a": a,
            "speaker_b": b,
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [
                {"speaker": a, "dia_id": "D1:1", "text": "Hi!"},
                {"speaker": b, "dia_id": "D1:2", "text": "Look at this.",
                 "blip_caption": "a photo of a lake", "img_url": ["http://x/y.jpg"]},
            ],
            "session_2_date_time": "9:00 am on 10 May, 2023",
            "session_2": [{"speaker": a, "dia_id": "D2:1", "text": "Back again."}],
            "session_3_date_time": "9:00 am on 11 May, 2023",
        },
        "qa": [{"question": "q?", "answer": "a", "evidence": ["D1:2"], "category": 4}],
        "event_summary": {},
    }  # fmt: skip


def test_import_locomo(memos: Any, client: MemosClient, tmp_path: Path) -> None:
    path = tmp_path / "locomo.json"
    sample_id = f"conv-{uuid.uuid4().hex[:6]}"
    path.write_text(json.dumps([_locomo_sample(sample_id, "Ann", "Ben"), _locomo_sample(
        sample_id + "-b", "Cy", "Di")]))  # fmt: skip
    out = _ok(memos("import", "--locomo", str(path), "--batch-size", "2")).splitlines()
    cubes = {c.name: c for c in client.list_cubes()}
    assert set(cubes) == {sample_id, sample_id + "-b"}
    assert out == [f"{name}\t{cubes[name].id}\t3 turns" for name in (sample_id, sample_id + "-b")]

    stored = list(client.iter_memories(cubes[sample_id].id))
    assert [(m.content, m.speaker, m.session_id, m.metadata, m.timestamp) for m in stored] == [
        ("Hi!", "Ann", "session_1", {"dia_id": "D1:1"}, datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("Look at this. [shares a photo: a photo of a lake]", "Ben", "session_1",
         {"dia_id": "D1:2"}, datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("Back again.", "Ann", "session_2", {"dia_id": "D2:1"},
         datetime(2023, 5, 10, 9, 0, tzinfo=UTC)),
    ]  # fmt: skip


def test_import_locomo_dev_file(memos: Any, client: MemosClient) -> None:
    if not LOCOMO_FILE.exists():
        pytest.skip(f"LoCoMo dev file not found at {LOCOMO_FILE} (set MEMOS_LOCOMO_FILE)")
    conversations = load_locomo(LOCOMO_FILE)
    conversations_by_id = {c.sample_id: c for c in conversations}
    _ok(memos("import", "--locomo", str(LOCOMO_FILE), "--batch-size", "1000"))
    cubes = client.list_cubes()
    assert sorted(c.name for c in cubes) == sorted(conversations_by_id)
    for cube in cubes:
        conv = conversations_by_id[cube.name]
        stored = list(client.iter_memories(cube.id))
        assert [m.metadata["dia_id"] for m in stored] == [t.dia_id for t in conv.turns]
        assert [m.content for m in stored] == [t.render() for t in conv.turns]


# --------------------------------------------------------------------------- serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_flags_and_env(tmp_path: Path) -> None:
    """Flags given win; flags not given come from MEMOS_* (here the port)."""
    port = _free_port()
    env = {
        **os.environ,
        "MEMOS_PORT": str(port),
        "MEMOS_DATA_DIR": str(tmp_path / "from-env"),
        "MEMOS_SCHEDULER__ENABLED": "false",
    }
    env.pop("MEMOS_ADMIN_KEY", None)
    flag_dir = tmp_path / "from-flag"
    cmd = [sys.executable, "-m", "memos", "serve", "--host", "127.0.0.1", "--data-dir"]
    proc = subprocess.Popen(
        [*cmd, str(flag_dir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "daemon did not answer in 120 s"
                time.sleep(0.25)
        assert health.json()["status"] == "ok"
        key = (flag_dir / "admin.key").read_text().strip()
        assert not (tmp_path / "from-env").exists()
        with MemosClient(f"http://127.0.0.1:{port}", api_key=key) as admin:
            assert admin.create_user("first").name == "first"
            with pytest.raises(NotFound):
                admin.get_cube("cube_nope")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
