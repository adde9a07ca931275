"""Soak: a real daemon under concurrent clients for a fixed time, then an audit of what it kept.

Starts `memos serve` on a fresh data dir (loopback only) with background enrichment on and index
maintenance every `--maintenance-s`, creates `--tenants` users, each with its own cube, plus one
cube owned by the first and granted (writer) to the others, then runs `--clients` closed-loop
clients (16 by default) for `--seconds` (600 by default). Each client belongs to one tenant and
mixes adds (1-8 items; about 1% of them carry a ~50 KB note), searches (some with filters, some
for one of its own notes' unique token), reads, edits, deletes, lists, cube stats, activation
builds (small inline texts, sessions, and ~1,400-token texts built in the background; at most
two live per client, the oldest deleted) and generations (2-8 tokens, some streamed), 30% of its
writes in the shared cube; past `--max-live` live memories a client deletes instead of adding,
so the data reaches a steady size. A 429 is counted as back-pressure and honoured
(`Retry-After`, at most 5 s); anything without an answer is counted by kind.

Reported: requests and statuses per route template with p50/p95/p99 latency; the daemon's RSS,
threads and open files sampled from /proc every `--sample-s` (and `/healthz`, `/metrics`
latency), with the RSS at the end of the warm-up, at the end, and the least-squares slope after
the warm-up; and the audit (`soak_verify`): every acknowledged write present exactly once in its
last acknowledged state, every acknowledged delete gone. Exits 1 on any 5xx, request without an
answer, audit problem or stuck client.

    python benchmarks/soak.py --json soak.json                 # 10 minutes
    python benchmarks/soak.py --seconds 60                     # a quick check
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
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.daemon import start_daemon  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from benchmarks.soak_load import OPS, Client, Recorder, Tenant  # noqa: E402
from benchmarks.soak_verify import verify  # noqa: E402


class Sampler(threading.Thread):
    """The daemon's RSS, threads and open files from /proc, and `/healthz` and `/metrics`
    latency, every `every` seconds; notices a daemon that died."""

    def __init__(
        self, pid: int, url: str, every: float, recorder: Recorder, live: Callable[[], int]
    ) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.pid, self.url, self.every, self.recorder = pid, url, every, recorder
        self.live = live  # the clients' live memories: the data's size
        self.samples: list[dict[str, float]] = []
        self.stopped = threading.Event()
        self.started_at = time.monotonic()

    def sample(self) -> dict[str, float] | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None  # the daemon is gone
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        started = time.perf_counter()
        try:
            health: int | str = httpx.get(f"{self.url}/healthz", timeout=30).status_code
        except httpx.HTTPError as exc:
            health = type(exc).__name__
        took = time.perf_counter() - started
        self.recorder.record("GET /healthz", health, took)
        started = time.perf_counter()
        caches: float | None = None
        try:
            answer = httpx.get(f"{self.url}/metrics", timeout=30)
            metrics: int | str = answer.status_code
            caches = cache_bytes(answer.text) / (1 << 20)
        except httpx.HTTPError as exc:
            metrics = type(exc).__name__
        self.recorder.record("GET /metrics", metrics, time.perf_counter() - started)
        return {
            "t_s": round(time.monotonic() - self.started_at, 1),
            "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
            "threads": int(fields["Threads"]),
            "fds": fds,
            "healthz_ms": round(took * 1000, 1),
            "live_memories": self.live(),
            "caches_mib": None if caches is None else round(caches, 1),
        }

    def run(self) -> None:
        while not self.stopped.is_set():
            sample = self.sample()
            if sample is None:
                return
            self.samples.append(sample)
            self.stopped.wait(self.every)


# The daemon's byte-bounded caches, as its /metrics reports them: RSS may grow while these fill
# up to their budgets; what grows beyond them is what would be a leak.
CACHE_GAUGES = (
    "memos_loaded_activations_bytes",
    "memos_dequantized_activations_bytes",
    "memos_generation_cache_bytes",
    "memos_indexes_loaded_bytes",
    "memos_chat_prefixes_bytes",
)


def cache_bytes(exposition: str) -> float:
    """The sum of the cache gauges in a Prometheus text exposition."""
    total = 0.0
    for line in exposition.splitlines():
        name, _, value = line.partition(" ")
        if name in CACHE_GAUGES:
            total += float(value)
    return total


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50_ms": round(float(p50), 1),
        "p95_ms": round(float(p95), 1),
        "p99_ms": round(float(p99), 1),
        "max_ms": round(max(values), 1),
    }


def route_rows(recorder: Recorder) -> list[dict[str, Any]]:
    rows = []
    for route in sorted(recorder.statuses):
        statuses = recorder.statuses[route]
        ints = {int(s): n for s, n in statuses.items() if s.isdigit()}
        rows.append(
            {
                "route": route,
                "requests": sum(statuses.values()),
                **percentiles(recorder.latencies[route]),
                "2xx": sum(n for s, n in ints.items() if 200 <= s < 300),
                "4xx": sum(n for s, n in ints.items() if 400 <= s < 500 and s != 429),
                "429": ints.get(429, 0),
                "5xx": sum(n for s, n in ints.items() if s >= 500),
                "no_answer": sum(n for s, n in statuses.items() if not s.isdigit()),
                "statuses": dict(sorted(statuses.items())),
            }
        )
    return rows


def memory_summary(
    samples: list[dict[str, float]], warmup_s: float, load_s: float
) -> dict[str, Any]:
    """RSS at the end of the warm-up and of the load, and its slope in between (least squares);
    samples after the load (clients finishing their last request) are left out."""
    load = [s for s in samples if s["t_s"] <= load_s] or samples[:1]
    if not load:
        return {}
    after = [s for s in load if s["t_s"] >= warmup_s] or load[-1:]

    def slope(part: list[dict[str, float]], less_caches: bool = False) -> float | None:
        if less_caches:
            part = [s for s in part if s.get("caches_mib") is not None]
        t = np.array([s["t_s"] for s in part]) / 60
        rss = np.array([s["rss_mib"] - (s["caches_mib"] if less_caches else 0) for s in part])
        fits = len(part) >= 3 and np.ptp(t) > 0
        return round(float(np.polyfit(t, rss, 1)[0]), 2) if fits else None

    # Once the clients' live memories stop growing, the data has its steady size.
    final = load[-1].get("live_memories", 0)
    steady_from = next(
        (s["t_s"] for s in load if s.get("live_memories", 0) >= 0.99 * final), load[-1]["t_s"]
    )
    steady = [s for s in after if s["t_s"] >= steady_from]

    last_half = [s for s in after if s["t_s"] >= (after[0]["t_s"] + load[-1]["t_s"]) / 2]
    return {
        "warmup_s": warmup_s,
        "rss_start_mib": load[0]["rss_mib"],
        "rss_at_warmup_mib": after[0]["rss_mib"],
        "rss_end_mib": load[-1]["rss_mib"],
        "rss_max_mib": max(s["rss_mib"] for s in load),
        "rss_growth_after_warmup_mib": round(load[-1]["rss_mib"] - after[0]["rss_mib"], 1),
        "rss_slope_after_warmup_mib_per_min": slope(after),
        "rss_slope_last_half_mib_per_min": slope(last_half),
        "steady_data_from_s": steady_from,
        "rss_slope_steady_data_mib_per_min": slope(steady),
        "rss_less_caches_slope_steady_data_mib_per_min": slope(steady, less_caches=True),
        "caches_at_warmup_mib": after[0].get("caches_mib"),
        "caches_end_mib": load[-1].get("caches_mib"),
        "live_memories_at_warmup": after[0].get("live_memories"),
        "live_memories_end": load[-1].get("live_memories"),
        "threads_at_warmup": after[0]["threads"],
        "threads_end": load[-1]["threads"],
        "fds_at_warmup": after[0]["fds"],
        "fds_end": load[-1]["fds"],
    }


def log_errors(lines: list[str]) -> dict[str, Any]:
    """Error records in (part of) the daemon's JSON log, and stray tracebacks."""
    errors, tracebacks, last = 0, 0, []
    for line in lines:
        if line.startswith("Traceback"):
            tracebacks += 1
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("level") in ("error", "critical"):
                errors += 1
                last = [*last[-4:], f"{record.get('logger')}: {record.get('msg')}"]
    return {"error_records": errors, "stray_tracebacks": tracebacks, "last_errors": last}


def log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def setup(url: str, admin_key: str, tenants: int) -> tuple[list[Tenant], str]:
    """Users with a cube each, and a cube of the first shared (writer) with the others."""
    made: list[Tenant] = []
    with httpx.Client(base_url=url, timeout=300) as http:
        admin = {"Authorization": f"Bearer {admin_key}"}
        for t in range(tenants):
            user = http.post("/v1/users", json={"name": f"soak-{t}"}, headers=admin).json()
            auth = {"Authorization": f"Bearer {user['api_key']}"}
            cube = http.post("/v1/cubes", json={"name": f"soak-{t}"}, headers=auth).json()
            made.append(Tenant(user["id"], user["api_key"], cube["id"]))
        owner = {"Authorization": f"Bearer {made[0].key}"}
        shared = http.post("/v1/cubes", json={"name": "shared"}, headers=owner).json()["id"]
        for tenant in made[1:]:
            grant = {"user_id": tenant.user_id, "role": "writer"}
            r = http.post(f"/v1/cubes/{shared}/grants", json=grant, headers=owner)
            r.raise_for_status()
        # Load the model once, in a scratch cube, so the first clients do not wait for it.
        scratch = http.post("/v1/cubes", json={"name": "prime"}, headers=owner).json()["id"]
        act = http.post(
            f"/v1/cubes/{scratch}/activations", json={"text": "Warm-up."}, headers=owner
        ).json()
        body = {"prompt": "Hello?", "activation_id": act["id"], "max_tokens": 2}
        http.post(f"/v1/cubes/{scratch}/generate", json=body, headers=owner).raise_for_status()
        http.delete(f"/v1/cubes/{scratch}", headers=owner).raise_for_status()
    return made, shared


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    admin_key = f"admin-{secrets.token_hex(8)}"
    env = {
        "MEMOS_HOST": "127.0.0.1",  # loopback only, whatever the caller's environment says
        "MEMOS_SCHEDULER__INDEX_MAINTENANCE_INTERVAL_S": str(args.maintenance_s),
        **dict(kv.split("=", 1) for kv in args.env),
    }
    if args.models_dir:
        env["MEMOS_EMBEDDER__CACHE_DIR"] = env["MEMOS_RUNTIME__CACHE_DIR"] = str(args.models_dir)
    proc, url = start_daemon(data_dir, admin_key, env, timeout=300)
    try:
        tenants, shared = setup(url, admin_key, args.tenants)
        recorder = Recorder()
        clients: list[Client] = []
        sampler = Sampler(
            proc.pid, url, args.sample_s, recorder, lambda: sum(len(c.live) for c in clients)
        )
        stop_at = time.monotonic() + args.seconds
        clients[:] = [
            Client(i, tenants[i % len(tenants)], shared, url, recorder, stop_at, args.timeout,
                   seed=args.seed * 1000 + i, max_live=args.max_live)
            for i in range(args.clients)
        ]  # fmt: skip
        threads = [  # daemon threads: a stuck one cannot keep this program alive
            threading.Thread(target=c.run, name=f"soak-{c.index}", daemon=True) for c in clients
        ]
        sampler.start()
        for thread in threads:
            thread.start()
        next_report = time.monotonic() + 30
        while any(t.is_alive() for t in threads):
            if time.monotonic() > stop_at + 3 * args.timeout + 30:
                break  # a client stuck past every deadline: reported, not waited for
            if proc.poll() is not None:
                print(f"daemon exited with {proc.returncode}", file=sys.stderr)
                break
            if time.monotonic() >= next_report:
                next_report += 30
                done = sum(sum(c.values()) for c in list(recorder.statuses.values()))
                rss = sampler.samples[-1]["rss_mib"] if sampler.samples else None
                left = max(0, round(stop_at - time.monotonic()))
                print(f"  {done} requests, RSS {rss} MiB, {left} s left", flush=True)
            time.sleep(0.5)
        stuck = [t.name for t in threads if t.is_alive()]
        sampler.stopped.set()
        sampler.join(timeout=60)
        daemon_alive = proc.poll() is None
        audit = (
            verify(url, {**{t.cube_id: t.key for t in tenants}, shared: tenants[0].key}, clients)
            if daemon_alive and not stuck
            else {"ok": False, "problems": ["not audited: the daemon died or a client is stuck"]}
        )
        before_stop = len(log_lines(data_dir / "daemon.log"))
    finally:
        stop(proc)
    warmup = args.warmup if args.warmup is not None else min(120.0, args.seconds / 5)
    routes = route_rows(recorder)
    totals = {
        key: sum(r[key] for r in routes)
        for key in ("requests", "2xx", "4xx", "429", "5xx", "no_answer")
    }
    totals["requests_per_s"] = round(totals["requests"] / args.seconds, 1)
    soak_errors = Counter[str]()
    for client in clients:
        soak_errors.update(client.soak_errors)
    ok = (
        totals["5xx"] == 0
        and totals["no_answer"] == 0
        and audit["ok"]
        and not stuck
        and daemon_alive
        and not soak_errors
    )
    return {
        "ok": ok,
        "command": " ".join(["python", *sys.argv]),
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "mix": OPS,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "commit": git_commit(),
        },
        "totals": totals,
        "routes": routes,
        "memory": memory_summary(sampler.samples, warmup, args.seconds),
        "samples": sampler.samples,
        "audit": audit,
        "daemon_log": {  # the shutdown apart: it cancels what is still running
            "during_run": log_errors(log_lines(data_dir / "daemon.log")[:before_stop]),
            "at_shutdown": log_errors(log_lines(data_dir / "daemon.log")[before_stop:]),
        },
        "daemon_alive_at_end": daemon_alive,
        "stuck_clients": stuck,
        "soak_errors": dict(soak_errors),
    }


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def print_report(report: dict[str, Any]) -> None:
    print_table(
        "Requests by route (latency in ms as the client saw it)",
        [
            ("route", "route", "<"),
            ("n", "requests", ">7"),
            ("p50", "p50_ms", ">8.1f"),
            ("p95", "p95_ms", ">8.1f"),
            ("p99", "p99_ms", ">8.1f"),
            ("max", "max_ms", ">8.1f"),
            ("4xx", "4xx", ">5"),
            ("429", "429", ">5"),
            ("5xx", "5xx", ">5"),
            ("no answer", "no_answer", ">5"),
        ],
        [*report["routes"], {"route": "total", **report["totals"]}],
    )
    samples = report["samples"]
    step = max(1, -(-len(samples) // 12))  # about 12 rows
    print_table(
        "The daemon over time (RSS from /proc, its caches from /metrics, /healthz latency)",
        [
            ("t (s)", "t_s", ">.0f"),
            ("RSS MiB", "rss_mib", ">.1f"),
            ("caches MiB", "caches_mib", ">.1f"),
            ("threads", "threads", ">d"),
            ("open fds", "fds", ">d"),
            ("healthz ms", "healthz_ms", ">.1f"),
            ("live memories", "live_memories", ">d"),
        ],
        samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else []),
    )
    print("\nDaemon memory:", json.dumps(report["memory"]))
    print("Audit:", json.dumps({k: v for k, v in report["audit"].items() if k != "problems"}))
    for problem in report["audit"].get("problems", [])[:10]:
        print("  problem:", problem)
    print("Daemon log:", json.dumps(report["daemon_log"]))
    if report["stuck_clients"] or report["soak_errors"]:
        print("Stuck clients:", report["stuck_clients"], "soak errors:", report["soak_errors"])
    print("\nOK" if report["ok"] else "\nFAILED")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600, help="how long the clients run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tenants", type=int, default=4, help="users, each with its own cube")
    parser.add_argument("--timeout", type=float, default=60, help="per request, in seconds")
    parser.add_argument("--warmup", type=float, help="default: a fifth of the run, at most 120 s")
    parser.add_argument("--sample-s", type=float, default=5, help="RSS sampling interval")
    parser.add_argument("--maintenance-s", type=int, default=60, help="index maintenance period")
    parser.add_argument(
        "--max-live",
        type=int,
        default=250,
        help="live memories per client; past it a client deletes instead of adding",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, help="default: a fresh temporary directory")
    parser.add_argument("--models-dir", type=Path, help="reuse converted models from here")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the daemon")
    parser.add_argument("--json", type=Path, help="write the whole report here")
    args = parser.parse_args()
    if min(args.clients, args.tenants, args.max_live) < 1 or args.seconds <= 0:
        parser.error("--clients, --tenants, --max-live and --seconds must be positive")
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.data_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="memos-soak-") as tmp:
            report = run(args, Path(tmp))
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
