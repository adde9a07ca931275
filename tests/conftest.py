"""Shared fixtures: the real embedder, real SQLite and PostgreSQL, real daemons over real HTTP.

Scopes are deliberate: the embedder, databases and servers are session-scoped (they are slow to
start and stateless between tests thanks to tenancy); every test makes its own user and cube.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSTGRES_ADMIN_URL = os.environ.get(
    "MEMOS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- databases ------------------------------------------------------------------------------

# Every test that needs PostgreSQL carries the `postgres` marker, so `pytest -m "not postgres"`
# runs the rest without a server: the postgres params of parametrized fixtures are marked where
# they are declared (`pytest.param(..., marks=pytest.mark.postgres)`), and tests that ask for
# `postgres_url` by name are marked here.


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "postgres_url" in names or "fresh_postgres_url" in names:
            item.add_marker(pytest.mark.postgres)


@contextmanager
def _fresh_postgres_database() -> Iterator[str]:
    import psycopg

    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"memos_test_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with _fresh_postgres_database() as url:
        yield url


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own (a fleet's shared database), dropped after."""
    with _fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated_db(request, tmp_path):
    """A migrated database of this test's own: a SQLite file, then a fresh PostgreSQL one."""
    from memos.db.engine import Database
    from memos.db.migrate import upgrade

    if request.param == "postgres":
        db = Database(request.getfixturevalue("fresh_postgres_url"))
    else:
        db = Database(f"sqlite:///{tmp_path / 'memos.db'}")
    upgrade(db)
    yield db
    db.dispose()


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """One ONNX export of the embedder and one conversion of the local model (GGUF to
    safetensors, ~20 s) for every daemon this session starts."""
    path = tmp_path_factory.mktemp("models")
    os.environ["MEMOS_EMBEDDER__CACHE_DIR"] = str(path)  # inherited by daemon subprocesses
    os.environ["MEMOS_RUNTIME__CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def embedder(model_cache):
    from memcube.embedder import Embedder, EmbedderConfig

    return Embedder(EmbedderConfig(cache_dir=model_cache))


# -- in-process server over real sockets ----------------------------------------------------


@dataclass
class LiveServer:
    url: str
    admin_key: str
    daemon: object
    backend: str

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        # Generous: the first activation loads (or converts) the model, slow on a loaded machine.
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)

    def new_user(self) -> tuple[str, str]:
        with self.client() as admin:
            body = admin.post("/v1/users", json={"name": f"u-{secrets.token_hex(3)}"}).json()
        return body["id"], body["api_key"]


def _start_live_server(settings, embedder, backend: str) -> Iterator[LiveServer]:
    import uvicorn

    from memos.api.app import create_app
    from memos.daemon import Daemon

    daemon = Daemon(settings, embedder=embedder)
    app = create_app(daemon)
    config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 300  # generous: a loaded machine is slow, never a failure
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    admin_key = settings.admin_key.get_secret_value()
    yield LiveServer(f"http://127.0.0.1:{settings.port}", admin_key, daemon, backend)
    server.should_exit = True
    thread.join(timeout=120)


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(request, tmp_path_factory, embedder) -> Iterator[LiveServer]:
    """A daemon (in this process, on a real port) on SQLite and then on PostgreSQL."""
    from memos.settings import Settings

    data_dir = tmp_path_factory.mktemp(f"daemon-{request.param}")
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    settings = Settings(
        data_dir=data_dir,
        database_url=url,
        admin_key=f"admin-{secrets.token_hex(8)}",
        port=free_port(),
        # Contract tests compare whole memory objects; enrichment, which rewrites keywords,
        # tags and links in the background, has tests of its own.
        enrichment={"enabled": False},
    )
    yield from _start_live_server(settings, embedder, request.param)


@pytest.fixture
def tenant(server: LiveServer) -> Iterator[tuple[httpx.Client, str]]:
    """A fresh user with a fresh cube: (client authenticated as the user, cube id)."""
    _, key = server.new_user()
    with server.client(key) as client:
        cube = client.post("/v1/cubes", json={"name": "main"}).json()
        yield client, cube["id"]


# -- daemon subprocesses --------------------------------------------------------------------


@dataclass
class DaemonProcess:
    url: str
    admin_key: str
    data_dir: Path
    port: int
    proc: subprocess.Popen | None = None
    env: dict | None = None

    def start(self, timeout: float = 300) -> None:
        command = [sys.executable, "-m", "memos", "serve", "--port", str(self.port)]
        with open(self.data_dir / "daemon.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [*command, "--data-dir", str(self.data_dir)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"daemon did not become healthy: {self.log_tail()}")

    def kill(self) -> None:
        """kill -9: no shutdown hooks, no index save."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        path = self.data_dir / "daemon.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        # Generous: the first activation loads (or converts) the model, slow on a loaded machine.
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)


def make_daemon_process(data_dir: Path, **env_overrides: str) -> DaemonProcess:
    port = free_port()
    admin_key = f"admin-{secrets.token_hex(8)}"
    env = {
        **os.environ,
        "MEMOS_ADMIN_KEY": admin_key,
        "HF_HUB_OFFLINE": "1",
        "MEMOS_ENRICHMENT__ENABLED": "false",  # see `server`; enrichment tests turn it on
        **env_overrides,
    }
    return DaemonProcess(f"http://127.0.0.1:{port}", admin_key, data_dir, port, env=env)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory, model_cache) -> Iterator[DaemonProcess]:
    """A real `memos serve` process on SQLite, shared by the SDK and CLI tests."""
    proc = make_daemon_process(tmp_path_factory.mktemp("daemon-proc"))
    proc.start()
    yield proc
    proc.stop()
