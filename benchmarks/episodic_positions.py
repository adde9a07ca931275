"""Where should kept tokens sit after block-wise eviction: original or compacted RoPE positions?

A budgeted cache (`kv_runtime.episodic`) keeps entries from all over a long context. With
original positions (EpiCache) a context longer than the model's positions (SmolLM2: 8,192) puts
its last blocks and the question at positions the model never saw; compacting the kept keys to
consecutive positions (StreamingLLM) keeps every position below budget + block, at the price of
distances the model never saw either (evicted spans vanish from the geometry).

Measure: a LoCoMo transcript (several conversations joined when one is too short) cut to each
`--contexts` length, prefilled under `--budget` in `--block`s with the `--scorer`, then the next
`--continuation` gold tokens teacher-forced after the cache; the mean per-token NLL (lower is
better). Rows for a context that fits the model compare the two where both are legal; rows past
it show what original positions cost there.

    nice -n 19 .venv/bin/python benchmarks/episodic_positions.py --contexts 4096 12288
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.episodic_scorers import turn_tokens  # noqa: E402
from benchmarks.locomo import load_locomo  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from kv_runtime import Runtime, RuntimeConfig  # noqa: E402
from kv_runtime.block_scorers import KVZIP_CONTINUE_PROMPT, KVZIP_PROMPT, make_block_scorer  # noqa: E402
from kv_runtime.episodic import prefill_under_budget  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo_dev.json"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 12288])
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--scorer", default="snapkv")
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--model-cache", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    cache_dir = args.model_cache or Path(tempfile.gettempdir()) / "memos-bench-models"
    runtime = Runtime.load(RuntimeConfig(cache_dir=cache_dir, threads=args.threads))
    ids: list[int] = []
    for conv in load_locomo(args.data):
        if len(ids) >= max(args.contexts) + args.continuation:
            break
        ids += turn_tokens(runtime, conv)[0]
    scorer = make_block_scorer(
        args.scorer,
        repeat_ids=runtime.tokenize(KVZIP_PROMPT),
        continue_ids=runtime.tokenize(KVZIP_CONTINUE_PROMPT),
    )
    rows: list[dict[str, Any]] = []
    for n in args.contexts:
        gold = ids[n : n + args.continuation + 1]
        for mode in ("original", "compacted"):
            started = time.perf_counter()
            built = prefill_under_budget(
                runtime.runner, ids[:n], budget_tokens=args.budget, block_tokens=args.block,
                scorer=scorer, positions=mode,
            )  # fmt: skip
            took = time.perf_counter() - started
            # runner.forward, not Runtime.logits: original positions past the model's limit are
            # exactly what is measured here, and the runtime would refuse them.
            cache = built.kv.to_transformers()
            logits = runtime.runner.forward(gold, cache, built.kv.length, all_logits=True)
            nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(gold[1:]))
            rows.append(
                {
                    "context_tokens": n,
                    "positions": mode,
                    "last_position": built.kv.length + len(gold) - 1,
                    "nll": float(nll),
                    "build_s": took,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    print_table(
        f"Kept-token positions after block-wise eviction: budget {args.budget}, block "
        f"{args.block}, scorer {args.scorer}, next {args.continuation} gold tokens; "
        f"{runtime.info.name} ({runtime.info.device}, {runtime.info.dtype}, max positions "
        f"{runtime.info.max_positions})",
        [
            ("context", "context_tokens", ">8d"),
            ("positions", "positions", "<10"),
            ("last pos", "last_position", ">8d"),
            ("NLL", "nll", ">8.4f"),
            ("build s", "build_s", ">8.1f"),
        ],
        rows,
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
