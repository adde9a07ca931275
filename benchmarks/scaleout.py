"""A fleet of 1, 2 and 3 daemons on one PostgreSQL database and one Redis, under mixed load.

For each fleet size (`--sizes`), on a fresh PostgreSQL database (created on the server of
`--postgres`, dropped after the run) and a flushed Redis database (`--redis`, db 7 by default:
flushed before each run and at the end), `memos serve` processes each with a data dir and
instance id of their own (`MEMOS_FLEET__INSTANCE_ID=bench-<i>`) and one shared admin key, on
loopback. Only the REST API and `MEMOS_*` settings are used. `--tenants` users each own a cube
seeded with `--seed-notes` notes; every daemon answers one search per cube and (with chat) one
chat turn before the clock starts, so model and index loads stay out of the figures.

The load, closed loop, round-robin over the daemons (each request goes to the next one):
- `--clients` threads add (a batch of `--batch` notes, weight `--add-weight`) or search
  (hybrid, top_k 10, weight 100 - add weight) in a random tenant's cube;
- one chat thread (unless `--no-chat`) opens a chat (`POST /v1/cubes/{id}/chats`) and sends
  `--turns` turns (`max_tokens` `--max-tokens`), every request on the next daemon, so
  consecutive turns of one chat land on different daemons;
- write-to-searchable delay: every `--probe-every`-th acknowledged add carries a unique token;
  probe threads then search for it (lexical, top_k 5) on a *different* daemon than the one that
  acknowledged the add, every `--probe-interval-ms`, until the note is among the hits
  (delay = acknowledgement to the answer that has it) or `--visible-timeout` passes. With one
  daemon (or one left alive) the probe asks the same daemon, reported apart ("same"), and so
  is a probe whose targets the kill changed midway ("mixed").

Then, for every size of 2 or more, the same run with daemon `--kill` SIGKILLed halfway. The
client drops a daemon after its first connection error (`--on-dead drop`, as a load balancer's
passive health check does) or keeps sending to it (`--on-dead keep`); errors are expected only
for requests on the killed daemon, from the kill on. A chat whose turn was lost with the killed
daemon is tried on a survivor every second ("orphaned chat"): it answers once the dead daemon's
turn lock is released (its lease expired). After every run, each cube is listed through a live
daemon: every acknowledged write (seed notes, adds, both memories of each answered chat turn)
must be there.

On a 2-core machine more daemons cannot add throughput: they share the same two cores, so these
figures show the cost of coordination and the correctness of the fleet, not scaling.

    python benchmarks/scaleout.py --json docs/scaleout.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.daemon import free_port  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from benchmarks.scaleout_load import (  # noqa: E402
    KINDS,
    SYSTEM,
    Fleet,
    Load,
    Sample,
    Tenant,
    chat_loop,
    client_loop,
    probe_loop,
)
from benchmarks.soak import git_commit, log_errors, log_lines, percentiles, stop  # noqa: E402
from benchmarks.synthetic import MemoryGenerator  # noqa: E402

# -- the fleet --------------------------------------------------------------------------------


def run_all(fn: Callable[[int], None], indexes: range) -> None:
    """fn(i) for every i at once, in threads; returns when all have."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in indexes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def daemon_env(args: argparse.Namespace, db_url: str, admin_key: str) -> dict[str, str]:
    cache = str(args.model_cache)
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MEMOS_HOST": "127.0.0.1",
        "MEMOS_LOG_LEVEL": "warning",
        "MEMOS_DATABASE_URL": db_url,
        "MEMOS_REDIS_URL": args.redis,
        "MEMOS_ADMIN_KEY": admin_key,
        "MEMOS_EMBEDDER__CACHE_DIR": cache,  # one ONNX export and model conversion for all
        "MEMOS_RUNTIME__CACHE_DIR": cache,
        "MEMOS_EMBEDDER__THREADS": "1",
        "MEMOS_RUNTIME__THREADS": "1",
        "MEMOS_SCHEDULER__INDEX_MAINTENANCE_INTERVAL_S": "604800",
        **dict(kv.split("=", 1) for kv in args.env),
    }


def start(
    env: dict[str, str], data_dir: Path, i: int, timeout: float = 300
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **env,
        "MEMOS_FLEET__INSTANCE_ID": f"bench-{i}",
        "MEMOS_FLEET__URL": url,
        "MEMOS_PORT": str(port),
        "MEMOS_DATA_DIR": str(data_dir),
    }
    with open(data_dir / "daemon.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "memos", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"daemon {i} did not start; see {data_dir / 'daemon.log'}")


def start_fleet(args: argparse.Namespace, size: int, env: dict[str, str], root: Path) -> Fleet:
    """Daemon 0 first (it migrates the fresh database), then the others at once."""
    dirs = [root / f"daemon-{i}" for i in range(size)]
    for d in dirs:
        d.mkdir()
    started = [start(env, dirs[0], 0)]
    rest: list[Any] = [None] * (size - 1)

    def one(i: int) -> None:
        rest[i - 1] = start(env, dirs[i], i)

    run_all(one, range(1, size))
    if any(r is None for r in rest):
        for p, _ in started + [r for r in rest if r]:
            p.kill()
        raise SystemExit("a daemon did not start")
    started += rest
    return Fleet([u for _, u in started], [p for p, _ in started], dirs, args.on_dead)


def setup(
    fleet: Fleet, http: httpx.Client, admin_key: str, args: argparse.Namespace, load: Load
) -> list[Tenant]:
    """Users with a seeded cube each; every daemon searches each cube (and answers one chat
    turn) once, so index and model loads happen before the clock."""
    url, admin = fleet.urls[0], {"Authorization": f"Bearer {admin_key}"}
    gen, tenants = MemoryGenerator(seed=1), []
    for t in range(args.tenants):
        user = http.post(f"{url}/v1/users", json={"name": f"scale-{t}"}, headers=admin)
        auth = {"Authorization": f"Bearer {user.raise_for_status().json()['api_key']}"}
        cube = http.post(f"{url}/v1/cubes", json={"name": f"scale-{t}"}, headers=auth).json()
        tenants.append(Tenant(auth["Authorization"][7:], cube["id"]))
        r = http.post(
            f"{url}/v1/cubes/{cube['id']}/memories",
            headers=auth,
            json={"items": gen.batch(args.seed_notes)},
        )
        load.ack(cube["id"], [m["id"] for m in r.raise_for_status().json()["items"]])

    def warm(i: int) -> None:
        for tenant in tenants:
            auth = {"Authorization": f"Bearer {tenant.key}"}
            path = f"{fleet.urls[i]}/v1/cubes/{tenant.cube_id}"
            http.post(f"{path}/search", json={"query": gen.question()}, headers=auth)
        if not args.no_chat:
            tenant = tenants[0]
            auth = {"Authorization": f"Bearer {tenant.key}"}
            path = f"{fleet.urls[i]}/v1/cubes/{tenant.cube_id}/chats"
            chat = http.post(path, json={"system": SYSTEM}, headers=auth).raise_for_status()
            reply = http.post(
                f"{path}/{chat.json()['id']}/messages",
                headers=auth,
                json={"content": "Hello?", "max_tokens": 2},
            ).raise_for_status()
            load.ack(
                tenant.cube_id,
                [reply.json()["user_memory_id"], reply.json()["assistant_memory_id"]],
            )

    run_all(warm, range(len(fleet.urls)))
    return tenants


def verify(fleet: Fleet, http: httpx.Client, tenants: list[Tenant], load: Load) -> dict[str, Any]:
    """Every acknowledged write, listed through a live daemon."""
    url = fleet.urls[fleet.survivor()]
    acked = stored = missing = extra = 0
    for tenant in tenants:
        auth = {"Authorization": f"Bearer {tenant.key}"}
        ids: set[str] = set()
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
            page = (
                http.get(f"{url}/v1/cubes/{tenant.cube_id}/memories", params=params, headers=auth)
                .raise_for_status()
                .json()
            )
            ids.update(m["id"] for m in page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                break
        want = load.acked.get(tenant.cube_id, set())
        acked, stored = acked + len(want), stored + len(ids)
        missing, extra = missing + len(want - ids), extra + len(ids - want)
    return {"acked_writes": acked, "stored": stored, "lost": missing, "unacked_stored": extra}


def fleet_facts(fleet: Fleet, http: httpx.Client, admin_key: str) -> dict[str, Any]:
    live = [i for i in range(len(fleet.urls)) if i != fleet.killed]
    health = [http.get(f"{fleet.urls[i]}/healthz").json() for i in live]
    r = http.get(
        f"{fleet.urls[live[0]]}/v1/fleet", headers={"Authorization": f"Bearer {admin_key}"}
    )
    return {
        "instances": [h.get("instance") for h in health],
        "healthz": health[0],
        "v1_fleet": r.json() if r.is_success else f"HTTP {r.status_code}",
    }


# -- one run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, size: int, kill: bool) -> dict[str, Any]:
    import psycopg
    import redis

    name = f"memos_scaleout_{secrets.token_hex(4)}"
    admin_pg = args.postgres.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin_pg, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = "postgresql+psycopg://" + admin_pg.split("://", 1)[1].rsplit("/", 1)[0] + f"/{name}"
    redis.Redis.from_url(args.redis).flushdb()
    admin_key = f"admin-{secrets.token_hex(8)}"
    root = Path(tempfile.mkdtemp(prefix="memos-scaleout-"))
    http = httpx.Client(timeout=args.timeout, limits=httpx.Limits(max_connections=64))
    fleet: Fleet | None = None
    try:
        fleet = start_fleet(args, size, daemon_env(args, db_url, admin_key), root)
        load = Load(fleet, http)
        tenants = setup(fleet, http, admin_key, args, load)
        facts = fleet_facts(fleet, http, admin_key)
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        deadline, counter, done = t0 + args.seconds, [0], threading.Event()
        workers = [
            threading.Thread(target=client_loop, args=(load, tenants, args, c, deadline, counter))
            for c in range(args.clients)
        ]
        if not args.no_chat:
            workers.append(threading.Thread(target=chat_loop, args=(load, tenants, args, deadline)))
        probers = [threading.Thread(target=probe_loop, args=(load, args, done)) for _ in range(2)]
        for t in workers + probers:
            t.start()
        if kill:
            time.sleep(max(0.0, t0 + args.seconds / 2 - time.monotonic()))
            fleet.killed, fleet.killed_at = args.kill, time.monotonic()
            fleet.procs[args.kill].send_signal(signal.SIGKILL)
        for t in workers:
            t.join()
        done.set()
        for t in probers:
            t.join()
        for t in list(load.orphan_threads):
            t.join()
        wall = time.monotonic() - t0
        checked = verify(fleet, http, tenants, load)
        result = summarise(args, load, t0, size, kill)
        result.update(
            checked,
            facts=facts,
            load_avg=[round(load_before, 2), round(os.getloadavg()[0], 2)],
            wall_s=round(wall, 1),
        )
        result["daemon_logs"] = [log_errors(log_lines(d / "daemon.log")) for d in fleet.dirs]
        return result
    finally:
        http.close()
        for p in fleet.procs if fleet else []:
            stop(p)
        with psycopg.connect(admin_pg, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        redis.Redis.from_url(args.redis).flushdb()
        if not args.keep_dirs:
            subprocess.run(["rm", "-rf", str(root)], check=False)
        else:
            print(f"data dirs kept in {root}", file=sys.stderr)


def summarise(
    args: argparse.Namespace, load: Load, t0: float, size: int, kill: bool
) -> dict[str, Any]:
    fleet, samples = load.fleet, load.samples
    kinds = []
    for kind in KINDS:
        mine = [s for s in samples if s.kind == kind]
        if not mine:
            continue
        ok = [s.ms for s in mine if s.outcome == "ok"]
        row = {"kind": kind, "requests": len(mine), "ok_per_s": round(len(ok) / args.seconds, 2)}
        kinds.append(row | percentiles(ok) | {"errors": len(mine) - len(ok)})

    def expected(s: Sample) -> bool:  # an error on the killed daemon, from the kill on
        return fleet.killed == s.daemon and s.started + s.ms / 1000 >= (fleet.killed_at or 0)

    failed = [s for s in samples if s.outcome != "ok"]
    unexpected = [s for s in failed if not expected(s)]
    load_ok = [s for s in samples if s.outcome == "ok" and s.kind != "probe"]
    out: dict[str, Any] = {
        "scenario": f"{size} daemon{'s' if size > 1 else ''}" + (", one killed" if kill else ""),
        "size": size,
        "killed": fleet.killed,
        "on_dead": args.on_dead if kill else None,
        "kinds": kinds,
        "ok_per_s": round(len(load_ok) / args.seconds, 2),
        "errors": len(unexpected),
        "errors_by_status": dict(
            Counter(f"{s.kind} {s.outcome} on daemon {s.daemon}" for s in unexpected)
        ),
        "killed_daemon_errors": dict(
            Counter(f"{s.kind} {s.outcome}" for s in failed if expected(s))
        ),
        "visible": {where: visibility(delays) for where, delays in load.visible.items()},
        "probes_skipped": load.probes_skipped,
        "orphaned_chats": load.orphans,
    }
    if kill and fleet.killed_at is not None:
        half = fleet.killed_at - t0
        before = sum(1 for s in load_ok if s.started < fleet.killed_at)
        out["ok_per_s_before_kill"] = round(before / half, 2)
        out["ok_per_s_after_kill"] = round((len(load_ok) - before) / (args.seconds - half), 2)
    return out


def visibility(probes: list[tuple[float | None, int]]) -> dict[str, Any]:
    """Delays of the probes that saw their note; `first_try`: seen by the first search (the
    delay is then that search's own latency at most)."""
    seen = [d for d, _ in probes if d is not None]
    first = sum(1 for d, tries in probes if d is not None and tries == 1)
    out = {"probes": len(probes), "not_visible": len(probes) - len(seen), "first_try": first}
    return out | percentiles(seen)


# -- report -----------------------------------------------------------------------------------

KIND_COLUMNS = [
    ("kind", "kind", "<10"),
    ("requests", "requests", "d"),
    ("ok/s", "ok_per_s", ".2f"),
    ("p50 ms", "p50_ms", ".1f"),
    ("p95 ms", "p95_ms", ".1f"),
    ("p99 ms", "p99_ms", ".1f"),
    ("max ms", "max_ms", ".1f"),
    ("errors", "errors", "d"),
]
SUMMARY_COLUMNS = [
    ("scenario", "scenario", "<26"),
    ("ok/s", "ok_per_s", ".2f"),
    ("add p95", "add_p95", ".1f"),
    ("search p95", "search_p95", ".1f"),
    ("turn p95", "chat_turn_p95", ".1f"),
    ("visible p95", "visible_p95", ".1f"),
    ("not visible", "not_visible", "d"),
    ("errors", "errors", "d"),
    ("on killed", "on_killed", "d"),
    ("lost", "lost", "d"),
]


def summary_row(r: dict[str, Any]) -> dict[str, Any]:
    row = {k: r[k] for k in ("scenario", "ok_per_s", "errors", "lost")}
    for k in r["kinds"]:
        row[f"{k['kind']}_p95"] = k["p95_ms"]
    vis = r["visible"]["other" if r["size"] > 1 else "same"]
    row["visible_p95"], row["not_visible"] = vis["p95_ms"], vis["not_visible"]
    row["on_killed"] = sum(r["killed_daemon_errors"].values()) if r["killed"] is not None else None
    return row


def print_run(result: dict[str, Any], args: argparse.Namespace) -> None:
    title = f"{result['scenario']}, {args.seconds:g} s of load (latency of answered requests)"
    print_table(title, KIND_COLUMNS, result["kinds"])
    for where, vis in result["visible"].items():
        if vis["probes"]:
            print(
                f"write-to-searchable, {where} daemon: {vis['probes']} probes ({vis['first_try']} "
                f"seen at the first search), p50 {vis['p50_ms']} ms, p95 {vis['p95_ms']} ms, max "
                f"{vis['max_ms']} ms; not visible within {args.visible_timeout:g} s: "
                f"{vis['not_visible']}"
            )
    health = result["facts"]["healthz"]
    print(
        f"errors: {result['errors']} {result['errors_by_status'] or ''}; /healthz redis "
        f"{health.get('redis', '-')}, changes {health.get('changes', '-')}"
    )
    if result["killed"] is not None:
        print(
            f"daemon {result['killed']} SIGKILLed at {args.seconds / 2:g} s (client: "
            f"{args.on_dead}): errors on it {result['killed_daemon_errors']}; ok/s before "
            f"{result['ok_per_s_before_kill']}, after {result['ok_per_s_after_kill']}; "
            f"orphaned chats {result['orphaned_chats']}"
        )
    print(
        f"acknowledged writes {result['acked_writes']}, stored {result['stored']}, lost "
        f"{result['lost']}, stored without an acknowledgement {result['unacked_stored']}; "
        f"instances {result['facts']['instances']}; GET /v1/fleet: "
        f"{str(result['facts']['v1_fleet'])[:80]}"
    )
    logs = [d["error_records"] for d in result["daemon_logs"]]
    print(f"daemon log error records: {logs}; wall {result['wall_s']} s")


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg
    import redis

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    with psycopg.connect(args.postgres.replace("+psycopg", ""), autocommit=True) as conn:
        pg = conn.execute("SHOW server_version").fetchone()
    return {
        "host": platform.node(),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "postgresql": pg[0] if pg else None,
        "redis": redis.Redis.from_url(args.redis).info("server")["redis_version"],
        "commit": git_commit(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,2,3", help="fleet sizes, comma separated")
    parser.add_argument("--seconds", type=float, default=60, help="load time of each run")
    parser.add_argument("--no-chat", action="store_true", help="adds and searches only")
    parser.add_argument("--no-kill", action="store_true", help="skip the runs with a kill")
    parser.add_argument("--kill", type=int, default=0, help="the daemon killed halfway")
    parser.add_argument(
        "--on-dead",
        choices=("drop", "keep"),
        default="drop",
        help="after a connection error: stop sending to that daemon, or not",
    )
    parser.add_argument("--clients", type=int, default=4, help="add/search client threads")
    parser.add_argument("--tenants", type=int, default=3, help="users, a cube each")
    parser.add_argument("--seed-notes", type=int, default=64, help="notes per cube at start")
    parser.add_argument("--batch", type=int, default=8, help="notes per add")
    parser.add_argument("--add-weight", type=int, default=30, help="percent of requests that add")
    parser.add_argument("--turns", type=int, default=4, help="turns per chat")
    parser.add_argument("--max-tokens", type=int, default=8, help="a chat reply's length")
    parser.add_argument("--probe-every", type=int, default=5, help="probe every n-th add")
    parser.add_argument("--probe-interval-ms", type=float, default=50)
    parser.add_argument("--visible-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument(
        "--orphan-timeout",
        type=float,
        default=90.0,
        help="seconds an orphaned chat is tried on a survivor",
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "MEMOS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
        help="an admin database URL; the run's database is created on its server",
    )
    parser.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/7",
        help="a Redis database of the benchmark's own: flushed before each run and at the end",
    )
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=Path.home() / ".cache" / "memos-bench-models",
        help="embedder export and converted model, shared by the daemons",
    )
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for every daemon")
    parser.add_argument("--keep-dirs", action="store_true", help="keep data dirs and logs")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.kill < 0 or any(s < 1 for s in sizes):
        raise SystemExit("sizes must be >= 1 and --kill a daemon index")
    args.model_cache.mkdir(parents=True, exist_ok=True)
    facts = machine(args)
    print(
        f"{facts['host']}: {facts['cpu']}; PostgreSQL {facts['postgresql']}, Redis "
        f"{facts['redis']} ({args.redis}); commit {facts['commit']}"
    )
    if (os.cpu_count() or 1) <= 4:
        print(
            f"Only {os.cpu_count()} cores: more daemons share the same CPUs and cannot add "
            "throughput; these runs show coordination cost and correctness, not scaling."
        )
    results = []
    started = time.monotonic()
    for size in sizes:
        for kill in (False, True):
            if kill and (args.no_kill or size < 2 or args.kill >= size):
                continue
            result = run(args, size, kill)
            results.append(result)
            print_run(result, args)
    print_table(
        "Summary (ms; errors: unexpected ones, must be 0)",
        SUMMARY_COLUMNS,
        [summary_row(r) for r in results],
    )
    print(f"total wall time {time.monotonic() - started:.0f} s")
    if args.json:
        meta = facts | {
            "args": vars(args) | {"json": str(args.json), "model_cache": str(args.model_cache)}
        }
        args.json.write_text(json.dumps({"runs": results, "meta": meta}, indent=2) + "\n")


if __name__ == "__main__":
    main()
