"""A real `memos serve` process for benchmarks: fresh data dir, loopback port, quiet logs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_daemon(
    data_dir: Path, admin_key: str, extra_env: dict[str, str], timeout: float = 120
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "MEMOS_ADMIN_KEY": admin_key,
        "HF_HUB_OFFLINE": "1",
        "MEMOS_LOG_LEVEL": "warning",
        # Keep background maintenance out of the measurements.
        "MEMOS_SCHEDULER__INDEX_MAINTENANCE_INTERVAL_S": "604800",
        **extra_env,
    }
    command = [sys.executable, "-m", "memos", "serve", "--port", str(port)]
    with open(data_dir / "daemon.log", "ab") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [*command, "--data-dir", str(data_dir)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"daemon did not start; see {data_dir / 'daemon.log'}")
