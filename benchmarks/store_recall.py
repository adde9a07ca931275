"""Store and recall at scale, measured through the REST API of a real daemon.

Starts `memos serve` on a fresh data dir, fills one cube with synthetic memories in batches of
64 (embedding included) and, at each size, measures:
- add throughput (memories/s) for the batches that grew the cube to that size;
- hybrid search latency p50/p95 as the client sees it (HTTP + query embedding + ranking);
- ANN recall@10: the dense top 10 from the HNSW index against exact brute-force search, for the
  same queries in the same run (the `mode="dense"` / `exact=true` search extensions).
At the largest size it also restarts the daemon and times the first search (cold index load).
`--enrichment off` (the default) measures the storage and recall path alone; `on` runs the
note-enrichment worker in the background as well, competing for the same cores.

    python benchmarks/store_recall.py --sizes 10000,100000 --json docs/store_recall.json
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
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.daemon import start_daemon  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from benchmarks.synthetic import MemoryGenerator  # noqa: E402
from memos.client import MemosClient  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure(client: MemosClient, cube_id: str, questions: list[str], recall_queries: int) -> dict:
    for q in questions[:20]:  # warm caches and the allocator
        client.search(cube_id, q, top_k=10)
    latencies = []
    for q in questions:
        started = time.perf_counter()
        client.search(cube_id, q, top_k=10)
        latencies.append((time.perf_counter() - started) * 1000)
    overlaps = []
    for q in questions[:recall_queries]:
        ann = client.search(cube_id, q, top_k=10, mode="dense")
        exact = client.search(cube_id, q, top_k=10, mode="dense", exact=True)
        truth = {h.memory.id for h in exact.hits}
        overlaps.append(len(truth & {h.memory.id for h in ann.hits}) / max(1, len(truth)))
    return {
        "search_p50_ms": round(statistics.median(latencies), 2),
        "search_p95_ms": round(percentile(latencies, 95), 2),
        "ann_recall_at_10": round(float(np.mean(overlaps)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated cube sizes")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--queries", type=int, default=300, help="timed searches per size")
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument("--data-dir", type=Path, help="default: a fresh temporary directory")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the daemon")
    parser.add_argument(
        "--enrichment",
        choices=("on", "off"),
        default="off",
        help="run the note-enrichment worker during the run (off: the storage/recall path alone)",
    )
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()

    sizes = sorted(int(s) for s in args.sizes.split(","))
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="memos-bench-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    admin_key = secrets.token_hex(16)
    extra_env = {
        "MEMOS_ENRICHMENT__ENABLED": "true" if args.enrichment == "on" else "false",
        **dict(kv.split("=", 1) for kv in args.env),
    }
    proc, url = start_daemon(data_dir, admin_key, extra_env)
    rows = []
    try:
        with MemosClient(url, api_key=admin_key, timeout=300) as client:
            cube_id = client.create_cube(f"bench-{secrets.token_hex(3)}").id
            gen = MemoryGenerator(seed=1)
            questions = [gen.question() for _ in range(args.queries)]
            stored = 0
            for size in sizes:
                started = time.perf_counter()
                grown = 0
                while stored < size:
                    n = min(args.batch, size - stored)
                    client.add_memories(cube_id, gen.batch(n))
                    stored += n
                    grown += n
                    if stored % (args.batch * 100) == 0:
                        rate = grown / (time.perf_counter() - started)
                        print(f"  {stored:>7} stored, {rate:.0f}/s", file=sys.stderr, flush=True)
                add_per_s = grown / (time.perf_counter() - started)
                row = {
                    "n": size,
                    "enrichment": args.enrichment,
                    **measure(client, cube_id, questions, args.recall_queries),
                    "add_per_s": round(add_per_s, 1),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        proc.terminate()  # a clean stop saves the indexes
        proc.wait(timeout=120)
        # Cold start: a restarted daemon loads the saved graph and the rows on first use.
        proc, url = start_daemon(data_dir, admin_key, extra_env)
        with MemosClient(url, api_key=admin_key, timeout=300) as client:
            started = time.perf_counter()
            client.search(cube_id, questions[0], top_k=10)
            cold_first_search_s = time.perf_counter() - started
        rows[-1]["cold_first_search_s"] = round(cold_first_search_s, 2)
    finally:
        proc.terminate()
        proc.wait(timeout=120)

    print_table(
        f"store_recall on {platform.node()} ({os.cpu_count()} cores), batches of {args.batch}",
        [
            ("memories", "n", "d"),
            ("add/s", "add_per_s", ".1f"),
            ("p50 ms", "search_p50_ms", ".2f"),
            ("p95 ms", "search_p95_ms", ".2f"),
            ("ANN R@10", "ann_recall_at_10", ".4f"),
            ("cold s", "cold_first_search_s", ".2f"),
        ],
        rows,
    )
    if args.json:
        meta = {
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "python": platform.python_version(),
            "batch": args.batch,
            "queries": args.queries,
            "env": extra_env,
        }
        args.json.write_text(json.dumps({"sizes": rows, "meta": meta}, indent=2))


if __name__ == "__main__":
    main()
