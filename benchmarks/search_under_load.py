"""Search latency while other work runs, measured through the REST API of a real daemon.

Two scenarios, each on a fresh `memos serve` with its own data dir:
- `bulk-add`: tenant B has a cube of `--b-notes` short notes and searches it; tenant A adds
  `--a-items` memories of `--a-kb` KB each in one request. B's search latency idle, then while
  A's add is in flight (tenant isolation on the embedding path).
- `enrichment`: one cube gets `--notes` short notes in batches of 64 with the enrichment worker
  on. Right after the last add, searches run back to back while notes are still pending
  enrichment; once none is, the same searches run idle. Search latency during and after, and
  the ratio of the p95s (same cube, same daemon). `--runs N` repeats it on N fresh daemons,
  for the spread on a noisy machine.

Every search is `top_k=10` hybrid, query embedding included, timed at the client; `server`
columns are the daemon's own `took_ms` (the search service, without HTTP and auth).

    python benchmarks/search_under_load.py --json docs/search_under_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.daemon import start_daemon  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from benchmarks.synthetic import MemoryGenerator  # noqa: E402
from memos.client import MemosClient  # noqa: E402


def summary(latencies: list[float], server: list[float] | None = None) -> dict[str, Any]:
    out = {
        "searches": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p95_ms": round(float(np.percentile(latencies, 95)), 2) if latencies else None,
        "max_ms": round(max(latencies), 2) if latencies else None,
    }
    if server:
        out["server_p50_ms"] = round(statistics.median(server), 2)
        out["server_p95_ms"] = round(float(np.percentile(server, 95)), 2)
    return out


def timed_search(
    client: MemosClient, cube_id: str, query: str, server: list[float] | None = None
) -> float:
    """Client-side milliseconds of one search; the daemon's own `took_ms` goes to `server`."""
    started = time.perf_counter()
    result = client.search(cube_id, query, top_k=10)
    if server is not None:
        server.append(result.took_ms)
    return (time.perf_counter() - started) * 1000


def fill(client: MemosClient, cube_id: str, gen: MemoryGenerator, n: int, batch: int = 64) -> None:
    for start in range(0, n, batch):
        client.add_memories(cube_id, gen.batch(min(batch, n - start)))


def bulk_add(args: argparse.Namespace, data_dir: Path) -> list[dict[str, Any]]:
    admin_key = secrets.token_hex(16)
    proc, url = start_daemon(data_dir, admin_key, {"MEMOS_ENRICHMENT__ENABLED": "false"})
    rows = []
    try:
        with MemosClient(url, api_key=admin_key, timeout=3600) as admin:
            key_a, key_b = (admin.create_user(f"bench-{n}").api_key for n in "ab")
        with (
            MemosClient(url, api_key=key_a, timeout=3600) as a,
            MemosClient(url, api_key=key_b, timeout=3600) as b,
        ):
            cube_a, cube_b = a.create_cube("bulk").id, b.create_cube("searched").id
            gen = MemoryGenerator(seed=2)
            fill(b, cube_b, gen, args.b_notes)
            questions = [gen.question() for _ in range(args.queries)]
            for q in questions[:20]:
                timed_search(b, cube_b, q)  # warm-up
            idle = [timed_search(b, cube_b, q) for q in questions]
            rows.append({"phase": "idle", **summary(idle)})
            filler = " ".join(gen.sentence() for _ in range(args.a_kb * 1024 // 60 + 1))
            items = [{"content": f"{i} {filler}"[: args.a_kb * 1024]} for i in range(args.a_items)]
            done = threading.Event()
            took: list[float] = []

            def add() -> None:
                started = time.perf_counter()
                try:
                    a.add_memories(cube_a, items)
                finally:
                    took.append(time.perf_counter() - started)
                    done.set()

            adder = threading.Thread(target=add)
            adder.start()
            busy = []
            while not done.is_set():
                busy.append(timed_search(b, cube_b, questions[len(busy) % len(questions)]))
            adder.join()
            rows.append({"phase": "during A's add", **summary(busy), "add_s": round(took[0], 2)})
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return rows


def enrichment(args: argparse.Namespace, data_dir: Path) -> list[dict[str, Any]]:
    admin_key = secrets.token_hex(16)
    proc, url = start_daemon(data_dir, admin_key, {"MEMOS_ENRICHMENT__ENABLED": "true"})
    rows = []
    try:
        with MemosClient(url, api_key=admin_key, timeout=3600) as client:
            cube_id = client.create_cube("enriched").id
            gen = MemoryGenerator(seed=3)
            started = time.perf_counter()
            fill(client, cube_id, gen, args.notes)
            added_s = time.perf_counter() - started
            questions = [gen.question() for _ in range(args.queries)]
            pending_at_start = client.get_cube(cube_id).stats.enrichment_pending
            during: list[float] = []
            during_server: list[float] = []
            pending = pending_at_start
            while pending > 0:
                question = questions[len(during) % len(questions)]
                during.append(timed_search(client, cube_id, question, during_server))
                if len(during) % 20 == 0:
                    pending = client.get_cube(cube_id).stats.enrichment_pending
            enriched_s = time.perf_counter() - started
            idle_server: list[float] = []
            idle = [timed_search(client, cube_id, q, idle_server) for q in questions]
            busy, calm = summary(during, during_server), summary(idle, idle_server)
            rows.append(
                {
                    "phase": "while enriching",
                    **busy,
                    "p95_vs_idle": round(busy["p95_ms"] / calm["p95_ms"], 2) if during else None,
                    "pending_at_start": pending_at_start,
                    "add_s": round(added_s, 2),
                    "all_enriched_s": round(enriched_s, 2),
                }
            )
            rows.append({"phase": "idle after", **calm})
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return rows


COLUMNS = [
    ("phase", "phase", "<16"),
    ("searches", "searches", "d"),
    ("p50 ms", "p50_ms", ".2f"),
    ("p95 ms", "p95_ms", ".2f"),
    ("max ms", "max_ms", ".2f"),
    ("server p50", "server_p50_ms", ".2f"),
    ("server p95", "server_p95_ms", ".2f"),
    ("p95/idle", "p95_vs_idle", ".2f"),
    ("add s", "add_s", ".2f"),
    ("enriched s", "all_enriched_s", ".1f"),
]


def spread(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Across runs of the enrichment scenario: min, median and max of each figure."""
    out: dict[str, Any] = {"runs": len(runs)}
    for phase, key in (
        (0, "p50_ms"), (0, "p95_ms"), (1, "p50_ms"), (1, "p95_ms"), (0, "p95_vs_idle")
    ):  # fmt: skip
        values = [run[phase][key] for run in runs if run[phase].get(key) is not None]
        name = f"{'during' if phase == 0 else 'idle'}_{key}"
        if values:
            out[name] = {
                "min": min(values), "median": statistics.median(values), "max": max(values)
            }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=("all", "bulk-add", "enrichment"), default="all")
    parser.add_argument("--b-notes", type=int, default=1000, help="bulk-add: B's cube size")
    parser.add_argument("--a-items", type=int, default=200, help="bulk-add: items in A's add")
    parser.add_argument("--a-kb", type=int, default=100, help="bulk-add: KB per item of A's add")
    parser.add_argument("--notes", type=int, default=5000, help="enrichment: notes added")
    parser.add_argument("--queries", type=int, default=200, help="distinct questions per phase")
    parser.add_argument("--runs", type=int, default=1, help="enrichment: fresh daemons to run")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()

    results: dict[str, Any] = {}
    if args.scenario in ("all", "bulk-add"):
        with tempfile.TemporaryDirectory(prefix="memos-bench-") as data_dir:
            results["bulk-add"] = bulk_add(args, Path(data_dir))
        title = f"bulk-add on {platform.node()} ({os.cpu_count()} cores)"
        print_table(title, COLUMNS, results["bulk-add"])
    if args.scenario in ("all", "enrichment"):
        runs = []
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="memos-bench-") as data_dir:
                runs.append(enrichment(args, Path(data_dir)))
            title = f"enrichment, run {run + 1} of {args.runs}, on {platform.node()}"
            print_table(f"{title} ({os.cpu_count()} cores)", COLUMNS, runs[-1])
        results["enrichment"] = runs[0] if args.runs == 1 else runs
        if args.runs > 1:
            results["enrichment_spread"] = spread(runs)
            print(json.dumps(results["enrichment_spread"], indent=1))
    if args.json:
        meta = {
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "python": platform.python_version(),
            "args": vars(args) | {"json": str(args.json)},
        }
        args.json.write_text(json.dumps({"scenarios": results, "meta": meta}, indent=2))


if __name__ == "__main__":
    main()
