"""The `memos` CLI against a real daemon, run through typer's CliRunner and checked with the SDK.

Each test makes its own user and cube; only the daemon is shared. `memos serve` is tested by
starting a second, real daemon in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
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

from benchmarks.locomo import load_locomo
from benchmarks.locomo_jsonl import convert
from memos.cli import app
from memos.client import Cube, MemosClient, NotFound, User

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

    def run(*args: str, env: dict[str, str | None] | None = None, input: str = "") -> Any:
        base: dict[str, str | None] = {
            "MEMOS_URL": daemon.url,
            "MEMOS_API_KEY": user.api_key,
            "MEMOS_DATA_DIR": str(daemon.data_dir),
            # What the test process may have set for its own daemon must not leak in.
            "MEMOS_HOST": None,
            "MEMOS_PORT": None,
            "MEMOS_CONFIG_FILE": None,
            "MEMOS_LIMITS__MAX_CONTENT_BYTES": None,
            "MEMOS_TIMEOUT": None,
        }
        return runner.invoke(app, list(args), env={**base, **(env or {})}, input=input)

    return run


def _ok(result: Any) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return str(result.stdout)


def _plain(usage_error: str) -> str:
    """A usage error's text without the box rich draws around it, on one line."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", usage_error).split())


def _fields(line: str) -> dict[str, str]:
    return dict(part.split(": ", 1) for part in line.strip().splitlines())


def _count(client: MemosClient, cube_id: str) -> int:
    stats = client.get_cube(cube_id).stats
    assert stats is not None
    return stats.memories


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


def test_cube_show(memos: Any, client: MemosClient, user: User) -> None:
    cube = client.create_cube("shown", description="with stats")
    client.add_memories(cube.id, [{"content": "one"}, {"content": "two"}])
    stats = client.get_cube(cube.id).stats
    assert stats is not None
    shown = _fields(_ok(memos("cube", "show", cube.id)))
    assert shown == {
        "id": cube.id, "name": "shown", "description": "with stats", "owner_id": user.id,
        "role": "owner", "created": cube.created_at.isoformat(timespec="minutes"),
        "memories": "2", "activations": "0", "bytes": str(stats.bytes),
        "enrichment_pending": str(stats.enrichment_pending),
    }  # fmt: skip
    as_json = json.loads(_ok(memos("cube", "show", cube.id, "--json")))
    assert (as_json["id"], as_json["stats"]["memories"]) == (cube.id, 2)
    missing = memos("cube", "show", "cube_nope")
    assert (missing.exit_code, missing.stderr) == (
        1,
        "error: cube_not_found: cube 'cube_nope' not found\n",
    )


def test_cube_delete_asks_first(memos: Any, daemon: Any, user: User, client: MemosClient) -> None:
    cube = client.create_cube("doomed")
    client.add_memories(cube.id, [{"content": "one"}])
    question = f"Delete cube 'doomed' ({cube.id}) with 1 memories and 0 activations? [y/N]: "

    no_stdin = memos("cube", "delete", cube.id)  # stdin empty: nobody can answer
    assert (no_stdin.exit_code, no_stdin.stdout) == (1, "")
    assert no_stdin.stderr == (
        f"{question}\nerror: confirmation_required: no answer on stdin, so cube {cube.id} was not "
        "deleted; pass --yes to delete without asking\n"
    )
    # The same from a real process with stdin on /dev/null, and with stdin closed (`<&-`).
    env = {**os.environ, "MEMOS_URL": daemon.url, "MEMOS_API_KEY": str(user.api_key)}
    command = f"{sys.executable} -m memos cube delete {cube.id}"
    for redirect in ("</dev/null", "<&-"):
        done = subprocess.run(
            ["bash", "-c", f"{command} {redirect}"], cwd=ROOT, env=env, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        assert (done.returncode, done.stdout, done.stderr) == (1, "", no_stdin.stderr)
    declined = memos("cube", "delete", cube.id, input="n\n")
    assert (declined.exit_code, declined.stdout) == (1, "")
    assert declined.stderr == f"{question}not deleted: {cube.id}\n"
    assert client.get_cube(cube.id).id == cube.id  # still there

    agreed = memos("cube", "delete", cube.id, input="y\n")
    assert (_ok(agreed), agreed.stderr) == (f"deleted {cube.id}\n", question)
    with pytest.raises(NotFound):
        client.get_cube(cube.id)

    other = client.create_cube("doomed too")
    assert _ok(memos("cube", "delete", other.id, "--yes")) == f"deleted {other.id}\n"
    assert client.list_cubes() == []


def test_cube_grant(memos: Any, daemon: Any, client: MemosClient) -> None:
    cube = client.create_cube("shared")
    with MemosClient(daemon.url, api_key=daemon.admin_key) as admin:
        friend = admin.create_user("friend")
    out = _ok(memos("cube", "grant", cube.id, friend.id, "--role", "reader"))
    assert out == f"granted reader on {cube.id} to {friend.id}\n"
    with MemosClient(daemon.url, api_key=friend.api_key) as theirs:
        assert [(c.id, c.role) for c in theirs.list_cubes()] == [(cube.id, "reader")]
        granted = json.loads(
            _ok(memos("cube", "grant", cube.id, friend.id, "--role", "writer", "--json"))
        )
        assert granted == {"cube_id": cube.id, "user_id": friend.id, "role": "writer"}
        assert [c.role for c in theirs.list_cubes()] == ["writer"]
        # A writer may not delete: refused before the question is asked.
        friend_env = {"MEMOS_API_KEY": str(friend.api_key)}
        refused = memos("cube", "delete", cube.id, env=friend_env)
        assert (refused.exit_code, refused.stderr) == (
            1,
            f"error: forbidden: your role on cube '{cube.id}' is writer; deleting needs owner\n",
        )
    bad_role = memos("cube", "grant", cube.id, friend.id, "--role", "admin")
    assert bad_role.exit_code == 2
    assert "'admin' is not one of 'reader', 'writer'" in _plain(bad_role.stderr)
    assert memos("cube", "grant", cube.id, friend.id).exit_code == 2  # --role is required


# --------------------------------------------------------------------------- finding the daemon


def test_host_and_port_locate_the_daemon_without_url(
    memos: Any, daemon: Any, client: MemosClient, tmp_path: Path
) -> None:
    cube = client.create_cube("found")
    for host in ("127.0.0.1", "0.0.0.0"):  # a wildcard bind is reached over loopback
        env = {"MEMOS_URL": None, "MEMOS_HOST": host, "MEMOS_PORT": str(daemon.port)}
        listed = json.loads(_ok(memos("cube", "list", "--json", env=env)))
        assert [c["id"] for c in listed] == [cube.id]

    # The TOML file the daemon reads (MEMOS_CONFIG_FILE) is read too; env vars win over it.
    toml = tmp_path / "memos.toml"
    toml.write_text(f'host = "127.0.0.1"\nport = {daemon.port}\n')
    env = {"MEMOS_URL": None, "MEMOS_HOST": None, "MEMOS_PORT": None,
           "MEMOS_CONFIG_FILE": str(toml)}  # fmt: skip
    assert cube.id in _ok(memos("cube", "list", env=env))
    dead = _closed_port()
    beaten = memos("cube", "list", env={**env, "MEMOS_PORT": str(dead)})
    assert beaten.stderr.startswith(
        f"error: connection_error: cannot reach http://127.0.0.1:{dead}/v1/cubes"
    )
    bad = memos("cube", "list", env={"MEMOS_URL": None, "MEMOS_PORT": "http"})
    assert (bad.exit_code, bad.stderr) == (
        1,
        "error: invalid_settings: port 'http' is not one a client can reach; set MEMOS_URL\n",
    )


def test_default_url_formats_ipv6_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    from memos.cli_support import daemon_url

    for name in ("MEMOS_HOST", "MEMOS_PORT", "MEMOS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert daemon_url() == "http://127.0.0.1:8765"
    monkeypatch.setenv("MEMOS_HOST", "::")
    assert daemon_url() == "http://[::1]:8765"
    monkeypatch.setenv("MEMOS_HOST", "fe80::1")
    monkeypatch.setenv("MEMOS_PORT", "9000")
    assert daemon_url() == "http://[fe80::1]:9000"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
                "--timestamp", "2023-05-25T15:14:00+02:00",
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


def test_an_episodic_activation_from_the_shell(memos: Any, client: MemosClient, cube: Cube) -> None:
    lines = ["We hiked the ridge trail to the summit.", "I baked sourdough bread with rye."]
    client.add_memories(cube.id, [{"content": c, "speaker": "Ana", "session_id": "s1"}
                                  for c in [lines[0]] * 4 + [lines[1]] * 4])  # fmt: skip
    episodic = ["--episodic-budget", "64", "--episodes", "2"]
    made = json.loads(
        _ok(memos("activation", "create", cube.id, "--session-id", "s1", *episodic, "--json"))
    )
    assert made["state"] == "ready" and [e["windows"] for e in made["episodes"]] == [[0], [1]]
    result = memos("generate", cube.id, "Where did Ana bake bread?", "--activation", made["id"],
                   "--max-tokens", "2")  # fmt: skip
    assert result.exit_code == 0 and "episode 1" in result.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--metadata", "{not json"], "not JSON"),
        (["--metadata", "[1, 2]"], "must be a JSON object"),
        (["--timestamp", "last tuesday"], "'last tuesday' is not an ISO 8601 time"),
        (["--timestamp", "2023-05-25T13:14:00"], "'2023-05-25T13:14:00' has no time zone"),
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
    assert ids("--since", "2023-03-01T00:00Z") == [puppy.id]
    assert ids("--until", "2023-03-01T00:00:00+00:00") == [cello.id]
    naive = memos("search", cube.id, "cello", "--since", "2023-03-01")
    assert naive.exit_code == 2 and "'2023-03-01' has no time zone" in naive.stderr

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
    assert _ok(result) == f"imported 600 memories into {cube.id}\t{path}\n"
    assert "600/600" in result.stderr  # the progress bar finished

    stored = list(client.iter_memories(cube.id))
    assert [m.content for m in stored] == [f"fact {i}" for i in range(600)]
    assert [m.metadata for m in stored] == [{"i": i} for i in range(600)]
    assert stored[61].timestamp == datetime(2023, 1, 1, 0, 1, tzinfo=UTC)
    assert stored[61].session_id == "s1"


def test_import_checks_the_whole_file_before_sending(
    memos: Any, client: MemosClient, cube: Cube, tmp_path: Path
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"content": "one", "timestamp": "2023-01-01T10:00:00Z"}\n'
        '{"content": "two"}\n'
        '{"content": "three", "timestamp": "2023-01-01T10:00:00"}\n'
        '{"content": "four"}\n'
        '{"content": " "}\n'
    )
    result = memos("import", cube.id, str(path))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{path}:3: timestamp: '2023-01-01T10:00:00' has no time zone (the API refuses naive "
        "times); write it with one, e.g. '2023-01-01T10:00:00Z' or '2023-01-01T10:00:00+02:00'",
        f"{path}:5: content: empty or only invisible characters",
        "error: invalid_input: 2 invalid lines; nothing was imported",
    ]
    assert client.list_memories(cube.id).items == []  # nothing was sent


def test_import_content_limit_follows_the_daemon_setting(
    memos: Any, client: MemosClient, cube: Cube, tmp_path: Path
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"content": "short"}\n{"content": "' + "x" * 11 + '"}\n')
    result = memos("import", cube.id, str(path), env={"MEMOS_LIMITS__MAX_CONTENT_BYTES": "10"})
    assert result.exit_code == 1
    assert f"{path}:2: content: 11 bytes; at most 10 allowed" in result.stderr
    assert client.list_memories(cube.id).items == []


def test_import_arguments(memos: Any, cube: Cube, tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"content": "x"}\n')

    def usage_error(*args: str) -> str:
        result = memos("import", *args)
        assert result.exit_code == 2, (result.stdout, result.stderr)
        return _plain(result.stderr)

    assert "give CUBE_ID and FILE" in usage_error(cube.id)
    assert "give CUBE_ID and FILE" in usage_error(cube.id, str(path), str(path))
    assert "No such option: --locomo" in usage_error("--locomo", str(path))
    assert "is not a file" in usage_error(cube.id, str(tmp_path / "absent.jsonl"))
    assert "is not a file" in usage_error("--create", str(tmp_path))
    assert "less than or equal to 1000" in usage_error(cube.id, str(path), "--batch-size", "1001")
    assert "go with --create" in usage_error(cube.id, str(path), "--skip-existing")
    assert "not both" in usage_error("--create", str(path), "--resume", "--skip-existing")
    (tmp_path / "sub").mkdir()
    twin = tmp_path / "sub" / "x.jsonl"
    twin.write_text('{"content": "x"}\n')
    assert "same name" in usage_error("--create", str(path), str(twin))


def _write_jsonl(path: Path, count: int, big: int | None = None, size: int = 0) -> None:
    """`count` lines "fact i"; line `big` (0-based) gets `size` bytes of content instead."""
    lines = [
        {"content": "x" * size if i == big else f"fact {i}", "session_id": f"s{i % 3}",
         "timestamp": f"2023-01-01T00:{i % 60:02d}:00+00:00", "metadata": {"i": i}}
        for i in range(count)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_import_resume_after_a_failed_batch(
    memos: Any, client: MemosClient, cube: Cube, tmp_path: Path
) -> None:
    # The CLI is told a larger content limit than the daemon's 1 MiB: line 251 passes the local
    # check and the daemon refuses its batch (the second) with 413. The first batch stays.
    path = tmp_path / "in.jsonl"
    _write_jsonl(path, 600, big=250, size=(1 << 20) + 1)
    args = ("import", cube.id, str(path), "--batch-size", "200")
    failed = memos(*args, "--max-content-bytes", str(4 << 20))
    assert failed.exit_code == 1
    assert failed.stderr.splitlines()[-2:] == [
        f"{path}: the first 200 of 600 memories are in cube {cube.id}; once the cause is fixed, "
        "the same command with --resume continues from line 201",
        "error: payload_too_large: items[50].content is 1048577 bytes; at most 1048576 allowed",
    ]
    assert [m.content for m in client.iter_memories(cube.id)] == [f"fact {i}" for i in range(200)]

    # Fixed; a second --resume finds everything present and sends nothing.
    _write_jsonl(path, 600)
    resumed = memos(*args, "--resume")
    assert _ok(resumed) == f"imported 400 memories into {cube.id} (200 already present)\t{path}\n"
    stored = list(client.iter_memories(cube.id))
    assert [m.content for m in stored] == [f"fact {i}" for i in range(600)]
    assert [m.metadata for m in stored] == [{"i": i} for i in range(600)]
    again = _ok(memos(*args, "--resume"))
    assert again == f"imported 0 memories into {cube.id} (600 already present)\t{path}\n"
    assert _count(client, cube.id) == 600


def test_import_resume_refuses_a_cube_that_is_not_this_import(
    memos: Any, client: MemosClient, cube: Cube, tmp_path: Path
) -> None:
    path = tmp_path / "in.jsonl"
    _write_jsonl(path, 5)
    _ok(memos("import", cube.id, str(path)))
    first = next(client.iter_memories(cube.id))
    client.update_memory(cube.id, first.id, content="edited")
    result = memos("import", cube.id, str(path), "--resume")
    assert (result.exit_code, result.stderr) == (
        1,
        f"error: resume_mismatch: cube {cube.id}: memory 1 ({first.id}) differs from line 1 "
        "in content: the cube is not an interrupted import of this file\n",
    )
    assert _count(client, cube.id) == 5

    # Without --resume, an import adds to a cube that holds memories, and says so.
    appended = memos("import", cube.id, str(path))
    assert _ok(appended) == f"imported 5 memories into {cube.id}\t{path}\n"
    assert appended.stderr.startswith(f"note: cube {cube.id} already holds 5 memories;")
    assert _count(client, cube.id) == 10


def test_import_create_skip_existing_and_resume(
    memos: Any, client: MemosClient, tmp_path: Path
) -> None:
    a, b, c = (tmp_path / f"{name}.jsonl" for name in ("alpha", "beta", "gamma"))
    _write_jsonl(a, 3)
    _write_jsonl(b, 4)
    _write_jsonl(c, 2)
    planned = _ok(memos("import", "--create", str(a), str(b), "--dry-run"))
    assert (
        planned
        == f"would import 3 memories into (new)\t{a}\nwould import 4 memories into (new)\t{b}\n"
    )
    assert client.list_cubes() == []

    out = _ok(memos("import", "--create", str(a), str(b), "--description", "from files"))
    cubes = {cube.name: cube for cube in client.list_cubes()}
    assert sorted(cubes) == ["alpha", "beta"]
    assert {cube.description for cube in cubes.values()} == {"from files"}
    assert out.splitlines() == [
        f"imported 3 memories into {cubes['alpha'].id}\t{a}",
        f"imported 4 memories into {cubes['beta'].id}\t{b}",
    ]

    # Existing names stop the whole import, gamma included, unless told what to do with them.
    refused = memos("import", "--create", str(a), str(b), str(c))
    assert (refused.exit_code, refused.stderr) == (
        1,
        f"error: cube_exists: you already have cubes named alpha ({cubes['alpha'].id}), "
        f"beta ({cubes['beta'].id}); pass --skip-existing to leave them as they are or --resume "
        "to continue their import\n",
    )
    assert sorted(cube.name for cube in client.list_cubes()) == ["alpha", "beta"]

    skipped = _ok(memos("import", "--create", str(a), str(c), "--skip-existing"))
    gamma = {cube.name: cube for cube in client.list_cubes()}["gamma"]
    assert gamma.description == "imported from gamma.jsonl"
    assert skipped.splitlines() == [
        f"alpha\t{cubes['alpha'].id}\tskipped: the cube exists",
        f"imported 2 memories into {gamma.id}\t{c}",
    ]
    # beta grew a line since: --resume sends only that one.
    _write_jsonl(b, 5)
    resumed = _ok(memos("import", "--create", str(a), str(b), "--resume"))
    assert resumed.splitlines() == [
        f"imported 0 memories into {cubes['alpha'].id} (3 already present)\t{a}",
        f"imported 1 memories into {cubes['beta'].id} (4 already present)\t{b}",
    ]
    counts = {cube.name: _count(client, cube.id) for cube in client.list_cubes()}
    assert counts == {"alpha": 3, "beta": 5, "gamma": 2}


def test_import_warns_of_fields_it_ignores(
    memos: Any, client: MemosClient, cube: Cube, tmp_path: Path
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"content": "a", "speakr": "Ann", "id": "mem_old"}\n')
    result = memos("import", cube.id, str(path))
    assert _ok(result) == f"imported 1 memories into {cube.id}\t{path}\n"
    assert f"{path}: ignored fields not in the import format: speakr (1 lines)" in result.stderr
    (memory,) = client.iter_memories(cube.id)
    assert (memory.content, memory.speaker) == ("a", None)


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


def test_import_locomo_converted(memos: Any, client: MemosClient, tmp_path: Path) -> None:
    """`python -m benchmarks.locomo_jsonl` output imports with `--create`: a cube a conversation."""
    path = tmp_path / "locomo.json"
    sample_id = f"conv-{uuid.uuid4().hex[:6]}"
    path.write_text(json.dumps([_locomo_sample(sample_id, "Ann", "Ben"), _locomo_sample(
        sample_id + "-b", "Cy", "Di")]))  # fmt: skip
    written = [file for file, _ in convert(path, tmp_path / "jsonl")]
    out = _ok(memos("import", "--create", *map(str, written), "--batch-size", "2")).splitlines()
    cubes = {c.name: c for c in client.list_cubes()}
    assert set(cubes) == {sample_id, sample_id + "-b"}
    assert out == [
        f"imported 3 memories into {cubes[name].id}\t{file}"
        for name, file in zip((sample_id, sample_id + "-b"), written, strict=True)
    ]

    stored = list(client.iter_memories(cubes[sample_id].id))
    assert [(m.content, m.speaker, m.session_id, m.metadata, m.timestamp) for m in stored] == [
        ("Hi!", "Ann", "session_1", {"dia_id": "D1:1"}, datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("Look at this. [shares a photo: a photo of a lake]", "Ben", "session_1",
         {"dia_id": "D1:2"}, datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("Back again.", "Ann", "session_2", {"dia_id": "D2:1"},
         datetime(2023, 5, 10, 9, 0, tzinfo=UTC)),
    ]  # fmt: skip


def test_import_locomo_dev_file(memos: Any, client: MemosClient, tmp_path: Path) -> None:
    if not LOCOMO_FILE.exists():
        pytest.skip(f"LoCoMo dev file not found at {LOCOMO_FILE} (set MEMOS_LOCOMO_FILE)")
    conversations_by_id = {c.sample_id: c for c in load_locomo(LOCOMO_FILE)}
    written = [str(file) for file, _ in convert(LOCOMO_FILE, tmp_path)]
    _ok(memos("import", "--create", *written, "--batch-size", "1000"))
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
