"""LoCoMo evidence recall through a real daemon, against a naive dense+BM25 fusion baseline.

Each conversation goes into its own cube through the SDK (turn text with the image caption
appended, speaker, `session_<n>` as session, the session date as `timestamp`, the turn's
dia_id in metadata), one after the other; a conversation's ingest time runs until every one
of its notes is enriched. Every question with evidence is asked through `/search`; its
recall@k is the fraction of its evidence turns among the top k hits. The baseline, computed in
this same run on the same turn text, is the naive fusion the issue names: exact MiniLM dense
top 50 and BM25 top 50, combined by reciprocal rank fusion (k=60).

    python benchmarks/locomo_recall.py --data ../shared/data/locomo/locomo_dev.json --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.daemon import start_daemon  # noqa: E402
from benchmarks.locomo import Conversation, load_locomo  # noqa: E402
from benchmarks.locomo_jsonl import memory_record  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from memcube.embedder import Embedder, EmbedderConfig  # noqa: E402
from memcube.lexical import BM25Index  # noqa: E402
from memos.client import MemosClient  # noqa: E402

KS = (5, 10, 25)
CATEGORIES = ("1", "2", "3", "4", "5")


def recall(ranked: list[str], evidence: tuple[str, ...], k: int) -> float:
    return len(set(ranked[:k]) & set(evidence)) / len(evidence)


def summarise(per_question: list[tuple[str, list[str], tuple[str, ...]]]) -> dict:
    """(category, ranked dia_ids, evidence) for each question -> overall and per-category recall."""
    by_cat: dict[str, list[dict[str, float]]] = defaultdict(list)
    rows = []
    for category, ranked, evidence in per_question:
        row = {f"recall@{k}": recall(ranked, evidence, k) for k in KS}
        rows.append(row)
        by_cat[category].append(row)

    def mean(items: list[dict[str, float]]) -> dict[str, float]:
        return {key: round(float(np.mean([r[key] for r in items])), 4) for key in items[0]}

    return {
        "overall": mean(rows),
        "per_category": {c: mean(by_cat[c]) for c in CATEGORIES if by_cat[c]},
        "questions": len(rows),
    }


def rrf(rankings: list[list[int]], k: float = 60.0) -> dict[int, float]:
    """Reciprocal rank fusion of ranked lists, kept here so the baseline never drifts."""
    fused: dict[int, float] = defaultdict(float)
    for ranked in rankings:
        for rank, item in enumerate(ranked, start=1):
            fused[item] += 1 / (k + rank)
    return fused


def naive_baseline(conversations: list[Conversation], embedder: Embedder) -> list:
    results = []
    for conv in conversations:
        ids = [t.dia_id for t in conv.turns]
        texts = [f"{t.speaker}: {t.render()}" for t in conv.turns]
        vectors = embedder.embed(texts)
        bm25 = BM25Index()
        for row, text in enumerate(texts):
            bm25.add(row, text)
        everything = np.ones(len(texts), dtype=bool)
        asked = [q for q in conv.questions if q.evidence]
        qvecs = embedder.embed([q.text for q in asked])
        for q, qvec in zip(asked, qvecs, strict=True):
            dense = np.argsort(-(vectors @ qvec))[:50].tolist()
            lexical_scores = bm25.scores(q.text, len(texts), everything)
            lexical = [int(r) for r in np.argsort(-lexical_scores)[:50] if lexical_scores[r] > 0]
            fused = rrf([dense, lexical])
            ranked = [ids[r] for r, _ in sorted(fused.items(), key=lambda x: -x[1])]
            results.append((str(q.category), ranked, q.evidence))
    return results


def wait_enriched(client: MemosClient, cube_id: str) -> None:
    """Until the cube's notes are all enriched (a no-op where enrichment is off or absent)."""
    while getattr(client.get_cube(cube_id).stats, "enrichment_pending", 0):
        time.sleep(0.2)


def run_daemon(
    conversations: list[Conversation], url: str, key: str
) -> tuple[list, dict[str, float], list]:
    results, latencies = [], []
    ingest: dict[str, float] = {}
    with MemosClient(url, api_key=key, timeout=600) as client:
        cubes = {}
        for conv in conversations:
            started = time.perf_counter()
            cube = client.create_cube(f"{conv.sample_id}-{secrets.token_hex(2)}")
            cubes[conv.sample_id] = cube.id
            items = [memory_record(t) for t in conv.turns]
            for start in range(0, len(items), 256):
                client.add_memories(cube.id, items[start : start + 256])
            wait_enriched(client, cube.id)
            ingest[conv.sample_id] = time.perf_counter() - started
        for conv in conversations:
            for q in conv.questions:
                if not q.evidence:
                    continue
                t0 = time.perf_counter()
                hits = client.search(cubes[conv.sample_id], q.text, top_k=max(KS)).hits
                latencies.append((time.perf_counter() - t0) * 1000)
                ranked = [h.memory.metadata.get("dia_id", "") for h in hits]
                results.append((str(q.category), ranked, q.evidence))
    return results, ingest, latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo_dev.json"))
    parser.add_argument("--conversations", type=int, help="use only the first N conversations")
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the daemon")
    args = parser.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    conversations = load_locomo(args.data)[: args.conversations]

    data_dir = Path(tempfile.mkdtemp(prefix="memos-locomo-"))
    key = secrets.token_hex(16)
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    proc, url = start_daemon(data_dir, key, extra_env)
    try:
        measured, ingest, latencies = run_daemon(conversations, url, key)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    embedder = Embedder(EmbedderConfig(cache_dir=data_dir / "models"))
    out = {
        **summarise(measured),
        "baseline": summarise(naive_baseline(conversations, embedder)),
        "ingest_s": round(sum(ingest.values()), 2),
        "ingest_per_conversation_s": {k: round(v, 2) for k, v in ingest.items()},
        "turns_per_conversation": {c.sample_id: len(c.turns) for c in conversations},
        "search_p50_ms": round(statistics.median(latencies), 2),
        "turns": sum(len(c.turns) for c in conversations),
        "env": extra_env,
    }
    rows = []
    for name, result in (("memosd", out), ("naive fusion", out["baseline"])):
        rows.append({"system": name, "category": "all", **result["overall"]})
        for category, values in result["per_category"].items():
            rows.append({"system": name, "category": category, **values})
    print_table(
        f"LoCoMo evidence recall, {len(conversations)} conversations, {out['questions']} "
        f"questions; ingest {out['ingest_s']} s, search p50 {out['search_p50_ms']} ms",
        [
            ("system", "system", ">12"),
            ("category", "category", ">8"),
            ("R@5", "recall@5", ".4f"),
            ("R@10", "recall@10", ".4f"),
            ("R@25", "recall@25", ".4f"),
        ],
        rows,
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
