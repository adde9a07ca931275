"""The scale-out benchmark's client: round-robin over a fleet of daemons, closed loop, adds,
searches and chat turns; probes for when an acknowledged add is searchable on another daemon;
every request and every acknowledged write recorded (see `benchmarks/scaleout.py`)."""

from __future__ import annotations

import argparse
import queue
import random
import secrets
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.synthetic import MemoryGenerator

SYSTEM = "You are a friendly assistant. Answer in one short sentence."
TRANSPORT = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
KINDS = ("add", "search", "chat_open", "chat_turn", "probe")


@dataclass(frozen=True)
class Tenant:
    key: str
    cube_id: str


@dataclass
class Fleet:
    """The daemons of one run and the client's view of them (round-robin, dropped ones)."""

    urls: list[str]
    procs: list[subprocess.Popen]
    dirs: list[Path]
    on_dead: str
    down: set[int] = field(default_factory=set)
    killed: int | None = None
    killed_at: float | None = None
    _turn: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pick(self, avoid: int | None = None) -> int:
        with self._lock:
            live = [i for i in range(len(self.urls)) if i not in self.down] or [0]
            others = [i for i in live if i != avoid] or live
            self._turn += 1
            return others[self._turn % len(others)]

    def failed(self, i: int) -> None:
        if self.on_dead == "drop":
            with self._lock:
                self.down.add(i)

    def survivor(self) -> int:
        return next(i for i in range(len(self.urls)) if i != self.killed)


@dataclass
class Sample:
    kind: str
    daemon: int
    started: float
    ms: float
    outcome: str  # "ok", an HTTP status, or the transport error's class name


class Load:
    """Records every request and every acknowledged write of one run."""

    def __init__(self, fleet: Fleet, http: httpx.Client) -> None:
        self.fleet, self.http = fleet, http
        self.samples: list[Sample] = []
        self.acked: dict[str, set[str]] = {}  # cube -> memory ids the daemons acknowledged
        # "other": probes that asked only daemons other than the one that acknowledged the add;
        # "same": only that daemon (a fleet of one, or no other left alive); "mixed": both
        # (the kill changed the targets midway: its delay says nothing).
        # (milliseconds from acknowledgement to the answer that has it, or None: not visible in
        # time; searches it took)
        self.visible: dict[str, list[tuple[float | None, int]]] = {
            "other": [],
            "same": [],
            "mixed": [],
        }
        self.probes_skipped = 0
        self.orphans: list[dict[str, Any]] = []
        self.orphan_threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.probes: queue.Queue[tuple[Tenant, str, str, int, float]] = queue.Queue(maxsize=64)

    def call(
        self, kind: str, i: int, tenant: Tenant, path: str, body: dict[str, Any]
    ) -> dict[str, Any] | None:
        """POST to daemon i; the JSON answer on 2xx, else None (recorded either way)."""
        started = time.monotonic()
        headers = {"Authorization": f"Bearer {tenant.key}"}
        try:
            r = self.http.post(f"{self.fleet.urls[i]}{path}", json=body, headers=headers)
            outcome = "ok" if r.is_success else str(r.status_code)
        except TRANSPORT as exc:
            outcome, r = type(exc).__name__, None
            self.fleet.failed(i)
        except httpx.TimeoutException as exc:
            outcome, r = type(exc).__name__, None
        ms = (time.monotonic() - started) * 1000
        with self.lock:
            self.samples.append(Sample(kind, i, started, ms, outcome))
        return r.json() if r is not None and outcome == "ok" else None

    def ack(self, cube_id: str, ids: list[str | None]) -> None:
        with self.lock:
            self.acked.setdefault(cube_id, set()).update(i for i in ids if i)


def client_loop(
    load: Load,
    tenants: list[Tenant],
    args: argparse.Namespace,
    seed: int,
    deadline: float,
    counter: list[int],
) -> None:
    rng, gen = random.Random(seed), MemoryGenerator(seed=seed)
    while time.monotonic() < deadline:
        tenant, i = rng.choice(tenants), load.fleet.pick()
        if rng.randrange(100) < args.add_weight:
            token = f"q{secrets.token_hex(6)}"
            items = gen.batch(args.batch)
            items[0]["content"] += f" (ref {token})"
            got = load.call(
                "add", i, tenant, f"/v1/cubes/{tenant.cube_id}/memories", {"items": items}
            )
            if got is None:
                continue
            ids = [m["id"] for m in got["items"]]
            load.ack(tenant.cube_id, ids)
            with load.lock:
                counter[0] += 1
                probe = counter[0] % args.probe_every == 0
            if probe:
                try:
                    load.probes.put_nowait((tenant, token, ids[0], i, time.monotonic()))
                except queue.Full:
                    load.probes_skipped += 1
        else:
            body = {"query": gen.question(), "top_k": 10}
            load.call("search", i, tenant, f"/v1/cubes/{tenant.cube_id}/search", body)


def chat_loop(load: Load, tenants: list[Tenant], args: argparse.Namespace, deadline: float) -> None:
    gen, n = MemoryGenerator(seed=99), 0
    while time.monotonic() < deadline:
        tenant = tenants[n % len(tenants)]
        n += 1
        chats = f"/v1/cubes/{tenant.cube_id}/chats"
        body = {"system": SYSTEM, "recall": {"top_k": 2}}
        chat = load.call("chat_open", load.fleet.pick(), tenant, chats, body)
        for _ in range(args.turns if chat else 0):
            if time.monotonic() >= deadline:
                break
            i = load.fleet.pick()
            turn = {"content": gen.question(), "max_tokens": args.max_tokens}
            path = f"{chats}/{chat['id']}/messages"  # type: ignore[index]
            reply = load.call("chat_turn", i, tenant, path, turn)
            if reply is not None:
                load.ack(tenant.cube_id, [reply["user_memory_id"], reply["assistant_memory_id"]])
                continue
            if load.fleet.killed == i:  # the turn died with its daemon: its lock may be held
                orphaned = threading.Thread(target=orphan, args=(load, tenant, path, args))
                orphaned.start()
                load.orphan_threads.append(orphaned)
            break


def orphan(load: Load, tenant: Tenant, path: str, args: argparse.Namespace) -> None:
    """Send a turn to a chat whose turn died with the killed daemon, every second, on a
    survivor, until it is answered (the dead daemon's turn lock released) or
    `--orphan-timeout` passes."""
    headers = {"Authorization": f"Bearer {tenant.key}"}
    statuses: Counter[str] = Counter()
    until = time.monotonic() + args.orphan_timeout
    while time.monotonic() < until:
        url = load.fleet.urls[load.fleet.survivor()]
        body = {"content": "Are you still there?", "max_tokens": 2}
        try:
            r = load.http.post(f"{url}{path}", json=body, headers=headers)
            statuses[str(r.status_code)] += 1
            if r.is_success:
                reply = r.json()
                load.ack(tenant.cube_id, [reply["user_memory_id"], reply["assistant_memory_id"]])
                break
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1
        time.sleep(1)
    killed_at = load.fleet.killed_at or time.monotonic()
    with load.lock:
        load.orphans.append(
            {
                "answered_s_after_kill": round(time.monotonic() - killed_at, 1)
                if statuses.get("200")
                else None,
                "tries": dict(statuses),
            }
        )


def probe_loop(load: Load, args: argparse.Namespace, done: threading.Event) -> None:
    while not (done.is_set() and load.probes.empty()):
        try:
            tenant, token, memory_id, origin, acked = load.probes.get(timeout=0.2)
        except queue.Empty:
            continue
        path = f"/v1/cubes/{tenant.cube_id}/search"
        body = {"query": token, "top_k": 5, "mode": "lexical"}
        asked, delay, tries = set(), None, 0
        while time.monotonic() - acked <= args.visible_timeout:
            target = load.fleet.pick(avoid=origin)
            asked.add(target == origin)
            tries += 1
            got = load.call("probe", target, tenant, path, body)
            if got is not None and any(h["memory"]["id"] == memory_id for h in got["hits"]):
                delay = (time.monotonic() - acked) * 1000
                break
            time.sleep(args.probe_interval_ms / 1000)
        with load.lock:
            where = "mixed" if len(asked) > 1 else "same" if True in asked else "other"
            load.visible[where].append((delay, tries))
