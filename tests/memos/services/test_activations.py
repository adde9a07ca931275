"""Activation builds as jobs, restarts, and models that do not match, in process."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from kv_runtime.store import _manifest_body
from memcube.enrichment import Enrichment, LlmEnricher, NoteInput, make_enricher
from memcube.enrichment.dates import resolve_dates
from memcube.enrichment.llm import fallback_reason, parse_reply
from memcube.errors import Conflict
from memos.daemon import Daemon
from memos.db.models import Activation
from memos.db.types import utcnow
from memos.services.activations import ActivationSource
from memos.services.auth import ADMIN_USER_ID
from memos.services.views import Principal
from memos.settings import Settings

ADMIN = Principal(ADMIN_USER_ID, True)
TEXT = " ".join(
    f"On day {i} Caroline walked to the lake and Melanie painted the sunrise." for i in range(12)
)


def make_daemon(data_dir, embedder, **runtime) -> Daemon:
    daemon = Daemon(
        Settings(
            data_dir=data_dir,
            admin_key="k" * 20,
            enrichment={"enabled": False},
            activations={"inline_max_tokens": 32},
            runtime=runtime,
        ),
        embedder=embedder,
    )
    daemon.start()
    return daemon


@pytest.fixture
def daemon(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder)
    yield daemon
    daemon.stop()


def test_a_large_build_runs_in_the_background_with_progress(daemon):
    cube = daemon.cubes.create(ADMIN, "c", "")
    act = daemon.activations.create(ADMIN, cube.id, ActivationSource(text=TEXT), 8, None)
    assert act.tokens > 32 and act.state == "building" and act.bytes == 0
    deadline = time.time() + 120
    while (seen := daemon.activations.get(ADMIN, cube.id, act.id)).state == "building":
        assert time.time() < deadline, "the build did not finish"
        assert 0.0 <= seen.progress < 1.0
        time.sleep(0.05)
    assert (seen.state, seen.progress, seen.kept_tokens) == ("ready", 1.0, act.tokens)
    assert seen.bytes > 0
    answer = daemon.activations.generate(ADMIN, cube.id, "Who painted?", act.id, 3)
    assert answer.reused_tokens == act.tokens


def test_a_build_interrupted_by_a_restart_is_failed_at_start(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder)
    cube = daemon.cubes.create(ADMIN, "c", "")
    with daemon.db.write() as s:  # what a kill -9 mid-build leaves behind
        s.add(Activation(id="act_cut", cube_id=cube.id, model="m", source={}, compression={},
                         tokens=900, bits=4, state="building", progress=0.4,
                         created_at=utcnow()))  # fmt: skip
    daemon.stop()
    daemon = make_daemon(tmp_path, embedder)
    seen = daemon.activations.get(ADMIN, cube.id, "act_cut")
    assert seen.state == "failed" and seen.error == "interrupted by a restart; build it again"
    with pytest.raises(Conflict) as refused:
        daemon.activations.generate(ADMIN, cube.id, "hi", "act_cut", 2)
    assert refused.value.code == "activation_not_ready"
    daemon.stop()


def test_an_activation_of_another_dtype_is_refused_with_a_mismatch(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder)
    cube = daemon.cubes.create(ADMIN, "c", "")
    act = daemon.activations.create(ADMIN, cube.id, ActivationSource(text="Hello there."), 16, None)
    assert act.state == "ready"
    daemon.stop()
    other = make_daemon(tmp_path, embedder, dtype="bfloat16")  # same data, another model dtype
    with pytest.raises(Conflict) as refused:
        other.activations.generate(ADMIN, cube.id, "Hi", act.id, 2)
    assert refused.value.code == "activation_mismatch"
    assert "dtype" in refused.value.message
    assert other.activations.get(ADMIN, cube.id, act.id).state == "ready"  # kept, not corrupt
    other.stop()


def test_the_llm_enricher_runs_on_the_local_runtime_and_never_loses_a_note(daemon, embedder):
    replies: list[str] = []  # what the real model answered, note by note

    def complete(messages: list[dict[str, str]]) -> str:
        replies.append(daemon.runtime.complete(messages))
        return replies[-1]

    enricher = make_enricher("llm", embedder.embed, runtime_complete=complete)
    assert isinstance(enricher, LlmEnricher)
    said = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    notes = [
        NoteInput(text, "Caroline", "s1", said)
        for text in ("I adopted a greyhound named Bolt.", "We went camping by the lake.")
    ]
    results = enricher.enrich(notes)
    local = make_enricher("local", embedder.embed).enrich(notes)
    assert len(replies) == 2  # the model was asked about each note
    # Each note took exactly the path its reply calls for: the model's enrichment when the
    # reply passes the schema, else local's, with the reason.
    for note, reply, result, fallback in zip(notes, replies, results, local, strict=True):
        try:
            parsed = parse_reply(reply)
        except ValueError as exc:
            assert result == replace(fallback, fallback=fallback_reason(exc))
        else:
            assert result == Enrichment(
                keywords=tuple(dict.fromkeys(k.lower() for k in parsed.keywords)),
                tags=tuple(dict.fromkeys(parsed.tags)),
                context=parsed.context,
                dates=resolve_dates(note.content, note.timestamp),
                enricher="llm",
            )
    if daemon.runtime.get().info.device == "cpu":  # greedy float32: the same text every time
        # SmolLM2-135M echoes the prompt, then starts a JSON object it never closes.
        assert [(r.enricher, r.fallback) for r in results] == [
            ("local", "ValueError: no JSON object in the reply")
        ] * 2
    assert (enricher.answered, enricher.fell_back) == (
        sum(r.enricher == "llm" for r in results), sum(r.enricher == "local" for r in results)
    )  # fmt: skip


def test_the_sweep_at_start_removes_files_without_rows_and_fails_rows_without_files(
    tmp_path, embedder
):
    daemon = make_daemon(tmp_path, embedder)
    cube = daemon.cubes.create(ADMIN, "c", "")
    kept = daemon.activations.create(ADMIN, cube.id, ActivationSource(text="Hello."), 16, None)
    lost = daemon.activations.create(ADMIN, cube.id, ActivationSource(text="Bye."), 16, None)
    assert kept.state == lost.state == "ready"
    daemon.stop()
    with daemon.db.write() as s:  # what a kill -9 mid-build leaves: a row and a partial file
        s.add(Activation(id="act_cut", cube_id=cube.id, model="m", source={}, compression={},
                         tokens=900, bits=4, state="building", created_at=utcnow()))  # fmt: skip
    daemon.db.dispose()
    root = daemon.settings.activation_dir / cube.id
    (root / "act_cut").mkdir()
    (root / "act_cut" / "kv-partial.safetensors.tmp").write_bytes(b"\0" * 100)
    shutil.copytree(root / kept.id, root / "act_orphan")  # files without a row
    shutil.rmtree(root / lost.id)  # a row without files
    daemon = make_daemon(tmp_path, embedder)
    assert sorted(p.name for p in root.iterdir()) == [kept.id]
    seen = {a.id: (a.state, a.error) for a in daemon.activations.list_activations(ADMIN, cube.id)}
    assert seen == {
        kept.id: ("ready", None),
        lost.id: ("failed", "its files are missing; build it again"),
        "act_cut": ("failed", "interrupted by a restart; build it again"),
    }
    daemon.stop()


def test_an_activation_stored_before_manifests_kept_their_messages_still_answers(daemon):
    cube = daemon.cubes.create(ADMIN, "c", "")
    source = ActivationSource(text="Melanie paints sunrises over the lake.")
    new, old = (daemon.activations.create(ADMIN, cube.id, source, 16, None) for _ in range(2))
    path = daemon.settings.activation_dir / cube.id / old.id / "manifest.json"
    body = json.loads(path.read_bytes())
    assert body.pop("messages") == [{"role": "system", "content": source.text}]
    del body["manifest_blake2b"]
    path.write_bytes(_manifest_body(body))  # as an older memosd wrote it
    generate = daemon.activations.generate
    answers = [generate(ADMIN, cube.id, "Who paints?", a.id, 8) for a in (new, old)]
    assert answers[0].text == answers[1].text and answers[1].reused_tokens == old.kept_tokens
