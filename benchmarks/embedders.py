"""Embedder backends compared: speed and what the speed costs in retrieval quality.

For each backend (fp32 torch, int8 dynamic-quantized torch) on this machine:
- throughput embedding LoCoMo turns in batches of 64, and single-query latency p50/p95;
- cosine similarity of its vectors to the fp32 vectors of the same texts;
- LoCoMo dense-only evidence recall@10 (exact search, each conversation on its own).

    python benchmarks/embedders.py --data ../shared/data/locomo/locomo_dev.json --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.locomo import load_locomo  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from memcube.embedder import BACKENDS, Embedder, EmbedderConfig  # noqa: E402


def evidence_recall(ranked: list[str], evidence: tuple[str, ...]) -> float:
    return len(set(ranked) & set(evidence)) / len(evidence)


def run(data: Path, queries: int, cache_dir: Path) -> dict:
    conversations = load_locomo(data)
    texts = [f"{t.speaker}: {t.render()}" for c in conversations for t in c.turns]
    results = {}
    reference = None
    # torch fp32 first: it is the reference the other backends' vectors are compared with.
    for backend in sorted(BACKENDS, key=lambda b: b != "torch"):
        embedder = Embedder(EmbedderConfig(backend=backend, cache_dir=cache_dir))
        started = time.perf_counter()
        vectors = embedder.embed(texts)
        per_s = len(texts) / (time.perf_counter() - started)
        questions = [q.text for c in conversations for q in c.questions][:queries]
        latencies = []
        for q in questions:
            t0 = time.perf_counter()
            embedder.embed_query(q)
            latencies.append((time.perf_counter() - t0) * 1000)
        if reference is None:
            reference = vectors
        cosine = np.einsum("ij,ij->i", vectors, reference)
        recalls = []
        offset = 0
        for conv in conversations:
            turn_vecs = vectors[offset : offset + len(conv.turns)]
            ids = [t.dia_id for t in conv.turns]
            offset += len(conv.turns)
            asked = [q for q in conv.questions if q.evidence]
            qvecs = embedder.embed([q.text for q in asked])
            scores = qvecs @ turn_vecs.T
            for q, row in zip(asked, scores, strict=True):
                top = np.argsort(-row)[:10]
                recalls.append(evidence_recall([ids[i] for i in top], q.evidence))
        results[backend] = {
            "embed_per_s": round(per_s, 1),
            "query_p50_ms": round(statistics.median(latencies), 2),
            "query_p95_ms": round(float(np.percentile(latencies, 95)), 2),
            "cosine_to_fp32_mean": round(float(cosine.mean()), 4),
            "cosine_to_fp32_min": round(float(cosine.min()), 4),
            "locomo_dense_recall_at_10": round(float(np.mean(recalls)), 4),
            "questions": len(recalls),
        }
    return {"turns": len(texts), "backends": results}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo_dev.json"))
    parser.add_argument("--queries", type=int, default=300, help="queries timed one at a time")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--cache-dir", type=Path, help="where the ONNX export goes (default: temp)")
    args = parser.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    out = run(args.data, args.queries, args.cache_dir or Path(tempfile.mkdtemp()))
    rows = [{"backend": name, **r} for name, r in out["backends"].items()]
    print_table(
        f"embedders on {out['turns']} LoCoMo turns",
        [
            ("backend", "backend", ">11"),
            ("embed/s", "embed_per_s", ".0f"),
            ("q p50 ms", "query_p50_ms", ".2f"),
            ("q p95 ms", "query_p95_ms", ".2f"),
            ("cos mean", "cosine_to_fp32_mean", ".4f"),
            ("cos min", "cosine_to_fp32_min", ".4f"),
            ("R@10", "locomo_dense_recall_at_10", ".4f"),
        ],
        rows,
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
