"""The LoCoMo to `memos import` JSONL converter (the import itself: tests/memos/test_cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.locomo_jsonl import convert
from memos.jsonl_format import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _sample(sample_id: str) -> dict[str, Any]:
    return {
        "sample_id": sample_id,
        "conversation": {
            "speaker_a": "Ann", "speaker_b": "Ben",
            "session_2_date_time": "9:00 am on 10 May, 2023",
            "session_2": [{"speaker": "Ann", "dia_id": "D2:1", "text": "Back again."}],
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [
                {"speaker": "Ann", "dia_id": "D1:1", "text": "Hi!"},
                {"speaker": "Ben", "dia_id": "D1:2", "text": "Look.", "blip_caption": "a lake"},
            ],
        },
        "qa": [{"question": "q?", "answer": "a", "evidence": ["D1:2"], "category": 4}],
    }  # fmt: skip


def test_one_file_per_conversation_in_the_import_format(tmp_path: Path) -> None:
    source = tmp_path / "locomo.json"
    source.write_text(json.dumps([_sample("conv-1"), _sample("conv-2")]))
    out = tmp_path / "out"
    assert convert(source, out) == [(out / "conv-1.jsonl", 3), (out / "conv-2.jsonl", 3)]
    assert sorted(p.name for p in out.iterdir()) == ["conv-1.jsonl", "conv-2.jsonl"]  # no .part
    lines = (out / "conv-1.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"content": "Hi!", "speaker": "Ann", "session_id": "session_1",
         "timestamp": "2023-05-08T13:56:00+00:00", "metadata": {"dia_id": "D1:1"}},
        {"content": "Look. [shares a photo: a lake]", "speaker": "Ben", "session_id": "session_1",
         "timestamp": "2023-05-08T13:56:00+00:00", "metadata": {"dia_id": "D1:2"}},
        {"content": "Back again.", "speaker": "Ann", "session_id": "session_2",
         "timestamp": "2023-05-10T09:00:00+00:00", "metadata": {"dia_id": "D2:1"}},
    ]  # fmt: skip
    checked = read_jsonl(out / "conv-1.jsonl")  # what `memos import` will accept
    assert checked.problems == [] and len(checked.lines) == 3 and not checked.unknown_fields


def test_command_line(tmp_path: Path) -> None:
    source = tmp_path / "locomo.json"
    source.write_text(json.dumps([_sample("conv-9")]))
    run = [sys.executable, "-m", "benchmarks.locomo_jsonl", str(source), str(tmp_path / "out")]
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (0, f"{tmp_path / 'out' / 'conv-9.jsonl'}\t3 turns\n")
    source.write_text('{"not": "a list"}')
    bad = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert bad.stderr == f"error: {source}: expected a JSON list of samples, got dict\n"
