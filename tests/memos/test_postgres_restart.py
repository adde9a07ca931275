"""PostgreSQL restarted under load: a daemon answers 503 database_unavailable while it is away,
serves again once it is back (no daemon restart), and loses no acknowledged write.

A private PostgreSQL server (initdb + pg_ctl on a free port, its socket under a temporary
directory) is stopped and started; the system server is never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, make_daemon_process

PG_BIN = Path("/usr/local/bin")
REQUEST_TIMEOUT_S = 10.0  # a request that takes longer during the outage is a hang


@dataclass
class PrivatePostgres:
    """A throwaway PostgreSQL server of this test's own (trust auth, user postgres)."""

    root: Path
    port: int
    user: str | None  # run the server as this OS user (initdb refuses root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, timeout=timeout, capture_output=True)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "-N",
                  timeout=120)  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        pytest.skip(f"initdb/pg_ctl not found in {PG_BIN}")
    user = None
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: initdb cannot be run")
        user = "postgres"
    # Under /tmp, short: the server's socket path must stay under ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="memos-pg-"))
    if user is not None:
        shutil.chown(root, user)
    server = PrivatePostgres(root, free_port(), user)
    server.init()
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Load:
    """Adds and searches in a loop, as fast as the daemon answers, recording every outcome."""

    url: str
    key: str
    cube_id: str
    acked: list[str] = field(default_factory=list)  # ids of the adds answered 201
    statuses: Counter[int] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)  # 500s, hangs, odd 503 bodies
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=REQUEST_TIMEOUT_S) as c:
            while not self.stop.is_set():
                token = secrets.token_hex(6)
                self._one(c, "post", f"/v1/cubes/{self.cube_id}/memories",
                          {"items": [{"content": f"restart note {token}"}]})  # fmt: skip
                self._one(c, "post", f"/v1/cubes/{self.cube_id}/search",
                          {"query": "restart note", "top_k": 3})  # fmt: skip

    def _one(self, client: httpx.Client, method: str, path: str, body: dict) -> None:
        try:
            r = client.request(method, path, json=body)
        except httpx.TimeoutException:
            self.bad.append(f"{path}: no answer in {REQUEST_TIMEOUT_S} s")
            return
        except httpx.HTTPError as exc:  # the connection dropped without an answer
            self.bad.append(f"{path}: {type(exc).__name__}: {exc}")
            return
        self.statuses[r.status_code] += 1
        if r.status_code == 201 and path.endswith("/memories"):
            self.acked += [item["id"] for item in r.json()["items"]]
        elif r.status_code == 503:
            error = r.json()["error"]
            if error["code"] != "database_unavailable" or r.headers.get("Retry-After") != "1":
                self.bad.append(f"{path}: 503 {error} {dict(r.headers)}")
        elif r.status_code >= 300:
            self.bad.append(f"{path}: {r.status_code} {r.text[:300]}")


def _all_ids(client: httpx.Client, cube_id: str) -> set[str]:
    ids, cursor = set(), None
    while True:
        params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        body = client.get(f"/v1/cubes/{cube_id}/memories", params=params).json()
        ids |= {item["id"] for item in body["items"]}
        cursor = body["next_cursor"]
        if cursor is None:
            return ids


def test_postgres_restart_under_load_answers_503_then_serves_and_loses_no_ack(
    tmp_path, private_postgres
):
    daemon = make_daemon_process(
        tmp_path / "daemon",
        MEMOS_DATABASE_URL=private_postgres.url,
        MEMOS_ACTIVATIONS__ENABLED="false",
        MEMOS_ENRICHMENT__ENABLED="true",  # its worker must outlive the outage
        MEMOS_FLEET__LEASE_S="3",
        MEMOS_FLEET__HEARTBEAT_S="0.5",
    )
    (tmp_path / "daemon").mkdir()
    daemon.start()
    try:
        with daemon.client() as admin:
            user = admin.post("/v1/users", json={"name": "restart"}).json()
        with daemon.client(user["api_key"]) as client:
            cube_id = client.post("/v1/cubes", json={"name": "main"}).json()["id"]
            load = Load(daemon.url, user["api_key"], cube_id)
            workers = [threading.Thread(target=load.run, daemon=True) for _ in range(3)]
            for worker in workers:
                worker.start()
            time.sleep(2.0)
            before = load.statuses[201]
            assert before > 0, load.statuses

            private_postgres.stop()  # in-flight queries are cut; new connections refused
            time.sleep(2.0)
            during = load.statuses.copy()
            private_postgres.start()
            restarted = time.monotonic()

            # Served again, without a daemon restart: a fresh run of adds all succeed.
            deadline = time.monotonic() + 30
            while load.statuses[201] < during[201] + 5:
                assert time.monotonic() < deadline, f"not serving again: {load.statuses}"
                time.sleep(0.1)
            recovered_s = time.monotonic() - restarted
            settled = load.statuses.copy()
            time.sleep(2.0)
            load.stop.set()
            for worker in workers:
                worker.join(timeout=REQUEST_TIMEOUT_S * 3)
            after = load.statuses - settled

            print(f"statuses {dict(load.statuses)}; served again {recovered_s:.2f} s after start")
            assert not load.bad, load.bad[:5]
            assert during[503] > 0, f"the outage was never seen: {during}"
            assert set(after) <= {200, 201} and after[201] > 0, after
            assert 500 not in load.statuses

            # Every acknowledged add is stored.
            stored = _all_ids(client, cube_id)
            assert set(load.acked) <= stored, len(set(load.acked) - stored)

            # The background threads lived through it: a note added now is enriched, and
            # this daemon's heartbeat renews its lease again.
            body = {"items": [{"content": "Ada met Grace in Paris."}]}
            note = client.post(f"/v1/cubes/{cube_id}/memories", json=body)
            assert note.status_code == 201, note.text
            note_id = note.json()["items"][0]["id"]
            deadline = time.monotonic() + 60
            while client.get(f"/v1/cubes/{cube_id}/memories/{note_id}").json()[
                "enrichment"
            ] not in ("done", "failed"):
                assert time.monotonic() < deadline, "the enrichment worker did not resume"
                time.sleep(0.2)
            assert (
                client.get(f"/v1/cubes/{cube_id}/memories/{note_id}").json()["enrichment"] == "done"
            )
        with daemon.client() as admin:  # jobs run again, and record their runs
            run_id = admin.post("/v1/jobs/usage_flush/run").json()["run_id"]
            deadline = time.monotonic() + 60
            while (run := admin.get(f"/v1/jobs/runs/{run_id}").json())["status"] == "running":
                assert time.monotonic() < deadline, "the job never finished"
                time.sleep(0.05)
            assert run["status"] == "ok", run
        _assert_heartbeat_resumed(private_postgres.url, restarted)
    finally:
        daemon.stop()


def _assert_heartbeat_resumed(url: str, restarted: float) -> None:
    """The daemon's heartbeat wrote its row after the restart (it beats every 0.5 s)."""
    import psycopg

    since_restart = time.monotonic() - restarted
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        (beat,) = conn.execute("SELECT max(heartbeat_at) FROM instances").fetchone()
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=UTC)
    age = (datetime.now(UTC) - beat).total_seconds()
    assert age < min(since_restart, 3.0), (age, since_restart)
