"""Convert a LoCoMo file into `memos import` JSONL: one file per conversation.

    python -m benchmarks.locomo_jsonl ../shared/data/locomo/locomo_dev.json /tmp/locomo
    memos import --create /tmp/locomo/*.jsonl      # one cube per file, named after it

Each turn becomes one line in the import format (README, "JSONL import and export"): `content`
is the turn text with the shared image's caption appended (`Turn.render`), `speaker`,
`session_id` `session_<n>`, `timestamp` the session date in UTC (`+00:00`: the file has no zone
and the CLI refuses naive timestamps), and `metadata` `{"dia_id": "D<session>:<turn>"}`, the id
the questions' evidence names. Files are `<OUTDIR>/<sample_id>.jsonl`, written aside and renamed
so an interrupted run leaves no truncated file. The questions are not written: they are not
memories (the benchmarks read them from the LoCoMo file itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.locomo import Conversation, Turn, load_locomo  # noqa: E402


def memory_record(turn: Turn) -> dict[str, Any]:
    """One turn as a memory in the import format (and the body of an `add_memories` item)."""
    return {
        "content": turn.render(),
        "speaker": turn.speaker,
        "session_id": f"session_{turn.session}",
        "timestamp": turn.timestamp.isoformat(),
        "metadata": {"dia_id": turn.dia_id},
    }


def write_jsonl(conv: Conversation, out_dir: Path) -> Path:
    """Write `<out_dir>/<sample_id>.jsonl`, one line a turn, in session and turn order."""
    if not conv.sample_id or "/" in conv.sample_id or conv.sample_id.startswith("."):
        raise ValueError(f"sample_id {conv.sample_id!r} cannot name a file")
    path = out_dir / f"{conv.sample_id}.jsonl"
    partial = path.with_name(path.name + ".part")
    with partial.open("w", encoding="utf-8") as out:
        for turn in conv.turns:
            out.write(json.dumps(memory_record(turn), ensure_ascii=False) + "\n")
    partial.replace(path)
    return path


def convert(locomo_file: Path, out_dir: Path) -> list[tuple[Path, int]]:
    """Every conversation of `locomo_file` into `out_dir`: (file written, lines) each."""
    conversations = load_locomo(locomo_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [(write_jsonl(conv, out_dir), len(conv.turns)) for conv in conversations]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("file", type=Path, help="a LoCoMo JSON file (a list of samples)")
    parser.add_argument("out_dir", type=Path, help="where to write <sample_id>.jsonl files")
    args = parser.parse_args(argv)
    try:
        written = convert(args.file, args.out_dir)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path, lines in written:
        print(f"{path}\t{lines} turns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
