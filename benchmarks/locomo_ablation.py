"""LoCoMo evidence recall, one ranking change at a time (offline, in one process).

`benchmarks/locomo_recall.py` measures the daemon as shipped. This program replays its ranking
pipeline in process over the same turns, so each step of it can be switched on in turn and
measured in the same run: the note vectors (content alone; + keywords, tags and context;
+ the turn it answers), the fusion (RRF k=60 against z-scores 0.55/0.45), and the temporal
signal. It uses the daemon's own parts: the `local` enricher, `embedding_text`, BM25, the
fusion policies and the time parser; candidate depth, link expansion (`follows`, 0.5, from the
top 5) and the lexical text are set as in the daemon's defaults. It leaves out what LoCoMo does
not exercise (filters, duplicate collapsing) and ANN (every conversation is searched exactly,
as the daemon does below 4,096 notes).

    python benchmarks/locomo_ablation.py --data ../shared/data/locomo/locomo_dev.json \
        --json docs/locomo_ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.locomo import Conversation, load_locomo  # noqa: E402
from benchmarks.locomo_recall import KS, summarise  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from memcube.embedder import Embedder, EmbedderConfig  # noqa: E402
from memcube.enrichment import NoteInput, make_enricher  # noqa: E402
from memcube.enrichment.dates import reference_date  # noqa: E402
from memcube.fusion import Fusion, ReciprocalRankFusion, Signal, ZScoreFusion  # noqa: E402
from memcube.lexical import BM25Index  # noqa: E402
from memcube.notes import embedding_text  # noqa: E402
from memcube.retrieval import RetrievalConfig  # noqa: E402
from memcube.temporal import parse_time_query  # noqa: E402

DEFAULTS = RetrievalConfig()
TOP_K = max(KS)


@dataclass
class Prepared:
    conv: Conversation
    vectors: dict[str, np.ndarray]  # variant -> (turns, dim)
    questions: np.ndarray  # (questions with evidence, dim)
    bm25: BM25Index
    days: list[tuple[date, ...]]
    follows: dict[int, list[int]]


def prepare(conv: Conversation, embedder: Embedder, enrich: Callable) -> Prepared:
    turns = conv.turns
    contents = [t.render() for t in turns]
    notes = [NoteInput(c, t.speaker, f"session_{t.session}", t.timestamp)
             for c, t in zip(contents, turns, strict=True)]  # fmt: skip
    enriched = enrich(notes)
    previous = [
        contents[i - 1] if i > 0 and turns[i - 1].session == t.session else None
        for i, t in enumerate(turns)
    ]
    texts = {
        "content": contents,
        "enriched": [
            embedding_text(c, e.keywords, e.tags, e.context)
            for c, e in zip(contents, enriched, strict=True)
        ],
        "enriched+previous": [
            embedding_text(c, e.keywords, e.tags, e.context, p)
            for c, e, p in zip(contents, enriched, previous, strict=True)
        ],
    }
    bm25 = BM25Index(DEFAULTS.bm25_k1, DEFAULTS.bm25_b)
    for row, (turn, content) in enumerate(zip(turns, contents, strict=True)):
        bm25.add(row, f"{turn.speaker}: {content}")
    follows: dict[int, list[int]] = {i: [] for i in range(len(turns))}
    for i in range(len(turns) - 1):
        if turns[i].session == turns[i + 1].session:
            follows[i].append(i + 1)
            follows[i + 1].append(i)
    asked = [q.text for q in conv.questions if q.evidence]
    return Prepared(
        conv=conv,
        vectors={name: embedder.embed(batch) for name, batch in texts.items()},
        questions=embedder.embed(asked),
        bm25=bm25,
        days=[
            (reference_date(t.timestamp), *e.dates) for t, e in zip(turns, enriched, strict=True)
        ],
        follows=follows,
    )


@dataclass(frozen=True)
class Variant:
    name: str
    vectors: str
    fusion: Fusion
    temporal_weight: float


def rank(p: Prepared, v: Variant, query: str, qvec: np.ndarray) -> list[int]:
    """The daemon's hybrid search + link expansion, over one conversation's turns (rows)."""
    n = len(p.conv.turns)
    pool = TOP_K + 2 * DEFAULTS.link_from
    depth = max(DEFAULTS.candidates, 2 * pool)
    dense_all = p.vectors[v.vectors] @ qvec
    lexical_all = p.bm25.scores(query, n, np.ones(n, dtype=bool))
    positive = np.flatnonzero(lexical_all > 0)
    by_lexical = positive[np.argsort(-lexical_all[positive], kind="stable")][:depth]
    rows = np.unique(np.concatenate([np.argsort(-dense_all, kind="stable")[:depth], by_lexical]))
    dense, lexical = dense_all[rows], lexical_all[rows]
    fused = v.fusion.fuse(
        {"dense": Signal(dense, np.ones(len(rows), bool)), "lexical": Signal(lexical, lexical > 0)}
    )
    when = parse_time_query(query)
    if not when.empty and v.temporal_weight > 0:
        fused += v.temporal_weight * np.array([when.matches(p.days[r]) for r in rows])
    order = np.lexsort((rows, -fused))[:pool]
    scores = {int(rows[i]): float(fused[i]) for i in order}
    weight = DEFAULTS.link_weights["follows"]
    gains: dict[int, float] = {}
    for row in list(scores)[: DEFAULTS.link_from]:
        for linked in p.follows[row]:
            gains[linked] = gains.get(linked, 0.0) + weight * max(scores[row], 0.0)
    for row, gain in gains.items():
        scores[row] = scores.get(row, 0.0) + gain
    return [row for row, _ in sorted(scores.items(), key=lambda x: (-x[1], x[0]))][:TOP_K]


def evaluate(prepared: list[Prepared], v: Variant) -> dict:
    results = []
    for p in prepared:
        ids = [t.dia_id for t in p.conv.turns]
        asked = [q for q in p.conv.questions if q.evidence]
        for q, qvec in zip(asked, p.questions, strict=True):
            ranked = [ids[r] for r in rank(p, v, q.text, qvec)]
            results.append((str(q.category), ranked, q.evidence))
    return summarise(results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo_dev.json"))
    parser.add_argument("--model-cache", type=Path, help="where the embedder's ONNX export is kept")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    embedder = Embedder(EmbedderConfig(cache_dir=args.model_cache))
    enricher = make_enricher("local", embedder.embed)
    prepared = [prepare(c, embedder, enricher.enrich) for c in load_locomo(args.data)]
    rrf = ReciprocalRankFusion(k=60)
    zscore = ZScoreFusion({"dense": DEFAULTS.dense_weight, "lexical": DEFAULTS.lexical_weight})
    steps = [
        Variant("content vectors, RRF", "content", rrf, 0.0),
        Variant("+ keywords, tags, context", "enriched", rrf, 0.0),
        Variant("+ the turn it answers", "enriched+previous", rrf, 0.0),
        Variant("+ z-score fusion", "enriched+previous", zscore, 0.0),
        Variant(
            "+ temporal signal (daemon)", "enriched+previous", zscore, DEFAULTS.temporal_weight
        ),
    ]
    half = len(prepared) // 2
    rows, out = [], []
    for v in steps:
        whole = evaluate(prepared, v)
        first, second = evaluate(prepared[:half], v), evaluate(prepared[half:], v)
        out.append({"variant": v.name, **whole, "halves_recall@10": [
            first["overall"]["recall@10"], second["overall"]["recall@10"]]})  # fmt: skip
        cats = {f"c{c}": whole["per_category"][c]["recall@10"] for c in whole["per_category"]}
        halves = {"h1": first["overall"]["recall@10"], "h2": second["overall"]["recall@10"]}
        rows.append({"variant": v.name, **whole["overall"], **cats, **halves})
    columns = [("step", "variant", "<28"), ("R@5", "recall@5", ".4f"),
               ("R@10", "recall@10", ".4f"), ("R@25", "recall@25", ".4f")]  # fmt: skip
    columns += [(f"R@10 c{c}", f"c{c}", ".4f") for c in "12345"]
    columns += [("R@10 1st half", "h1", ".4f"), ("R@10 2nd half", "h2", ".4f")]
    print_table(f"LoCoMo ablation, {len(prepared)} conversations", columns, rows)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
