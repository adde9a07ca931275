"""Persistence: bit-exact round trips, refused mismatches, detected corruption, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from kv_runtime import (
    ActivationCorrupt,
    ActivationMismatch,
    CompressedKV,
    CompressionConfig,
    KVCache,
    Runtime,
    delete_activation,
    load_activation,
    open_activation,
    open_episodes,
    read_manifest,
    save_activation,
    save_episodes,
)

SETTINGS = {
    "4-bit evicted": CompressionConfig(
        bits=4, group_size=32, residual_tokens=8, budget_tokens=72, window_tokens=16
    ),
    "2-bit": CompressionConfig(bits=2, group_size=32, residual_tokens=16),
    "16-bit": CompressionConfig(bits=16),
}


def _stored_tensors(compressed: CompressedKV) -> list[torch.Tensor]:
    out = [t for layer in compressed.layers for t in layer.stored().values()]
    return out + ([compressed.positions] if compressed.positions is not None else [])


@pytest.fixture(scope="module")
def four_bit(runtime: Runtime, kv: KVCache) -> CompressedKV:
    return runtime.compress(kv, SETTINGS["4-bit evicted"])


@pytest.mark.parametrize("name", list(SETTINGS))
def test_round_trip_is_bit_exact(runtime: Runtime, kv: KVCache, tmp_path: Path, name: str) -> None:
    compressed = runtime.compress(kv, SETTINGS[name])
    manifest = save_activation(tmp_path, compressed, runtime.fingerprint)
    loaded = load_activation(tmp_path, runtime.fingerprint)
    assert (loaded.token_ids, loaded.settings, loaded.dtype) == (
        kv.token_ids,
        SETTINGS[name],
        torch.float32,
    )
    assert loaded.spans == compressed.spans
    ours, theirs = _stored_tensors(loaded), _stored_tensors(compressed)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(
        runtime.decompress(loaded).keys, runtime.decompress(compressed).keys, strict=True
    ):
        assert torch.equal(a, b)
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert manifest.bytes == on_disk == read_manifest(tmp_path).bytes
    assert manifest.kv_bytes == compressed.nbytes() < manifest.bytes < compressed.nbytes() + 40_000
    assert manifest.kept_tokens == compressed.kept and manifest.tokens == kv.length
    assert manifest.fingerprint == runtime.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["manifest.json", manifest.blob])


def test_evicted_positions_survive_the_round_trip(
    runtime: Runtime, four_bit: CompressedKV, tmp_path: Path
) -> None:
    save_activation(tmp_path, four_bit, runtime.fingerprint)
    loaded = load_activation(tmp_path, runtime.fingerprint)
    assert four_bit.positions is not None and loaded.positions is not None
    assert loaded.positions.shape == (30, 3, 72)
    assert torch.equal(loaded.positions, four_bit.positions)


@pytest.mark.parametrize(
    ("field", "value"),
    [("dtype", "bfloat16"), ("tokenizer_hash", "0" * 32), ("weights_hash", "f" * 32)],
)
def test_another_model_tokenizer_or_dtype_is_refused(
    runtime: Runtime, four_bit: CompressedKV, tmp_path: Path, field: str, value: str
) -> None:
    save_activation(tmp_path, four_bit, runtime.fingerprint)
    other = dataclasses.replace(runtime.fingerprint, **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ActivationMismatch) as caught:
        load_activation(tmp_path, other)
    stored = getattr(runtime.fingerprint, field)
    assert caught.value.differences == {field: (stored, value)}
    assert caught.value.code == "activation_mismatch"
    assert f"{field}: stored {stored!r} != runtime {value!r}" in caught.value.message


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d, blob: _flip_byte(blob, blob.stat().st_size // 2), "is corrupt"),
        (lambda d, blob: os.truncate(blob, blob.stat().st_size - 100), "is corrupt"),
        (lambda d, blob: blob.unlink(), "is missing"),
        (lambda d, blob: (d / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda d, blob: os.truncate(d / "manifest.json", 200), "not a readable manifest"),
        (
            lambda d, blob: (d / "manifest.json").write_text(
                (d / "manifest.json").read_text().replace('"kept_tokens": 72', '"kept_tokens": 71')
            ),
            "does not match its checksum",
        ),
    ],
    ids=["flipped-bit", "truncated-blob", "missing-blob", "no-manifest", "truncated-manifest",
         "edited-manifest"],
)  # fmt: skip
def test_corrupt_or_truncated_activations_are_reported_not_loaded(
    runtime: Runtime, four_bit: CompressedKV, tmp_path: Path, damage, message: str
) -> None:
    manifest = save_activation(tmp_path, four_bit, runtime.fingerprint)
    damage(tmp_path, tmp_path / manifest.blob)
    with pytest.raises(ActivationCorrupt, match=message) as caught:
        load_activation(tmp_path, runtime.fingerprint)
    assert caught.value.code == "activation_corrupt"


@pytest.mark.parametrize("failing", ["blob", "manifest"])
def test_a_failed_save_leaves_the_previous_activation_intact(
    runtime: Runtime, kv: KVCache, four_bit: CompressedKV, tmp_path: Path, monkeypatch, failing
) -> None:
    first = save_activation(tmp_path, four_bit, runtime.fingerprint)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    replacement = runtime.compress(kv, SETTINGS["2-bit"])
    real_replace = os.replace

    def crash(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        if (Path(dst).name == "manifest.json") == (failing == "manifest"):
            raise OSError("disk full")  # after the temporary file was written and fsynced
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_activation(tmp_path, replacement, runtime.fingerprint)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing left over
    loaded = load_activation(tmp_path, runtime.fingerprint)
    assert loaded.settings == four_bit.settings and read_manifest(tmp_path).blob == first.blob
    for a, b in zip(_stored_tensors(loaded), _stored_tensors(four_bit), strict=True):
        assert torch.equal(a, b)


def test_saving_again_replaces_and_deleting_removes(
    runtime: Runtime, kv: KVCache, four_bit: CompressedKV, tmp_path: Path
) -> None:
    save_activation(tmp_path, four_bit, runtime.fingerprint)
    second = save_activation(tmp_path, runtime.compress(kv, SETTINGS["2-bit"]), runtime.fingerprint)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["manifest.json", second.blob])
    assert load_activation(tmp_path, runtime.fingerprint).settings.bits == 2
    body = json.loads((tmp_path / "manifest.json").read_text())
    assert body["format"] == "memosd-activation/1" and body["token_ids"] == list(kv.token_ids)
    delete_activation(tmp_path)
    assert not tmp_path.exists()


def test_a_16_bit_activation_takes_two_bytes_an_element_on_disk(
    runtime: Runtime, kv: KVCache, tmp_path: Path
) -> None:
    manifest = save_activation(
        tmp_path, runtime.compress(kv, SETTINGS["16-bit"]), runtime.fingerprint
    )
    elements = 2 * kv.layers * kv.kv_heads * kv.length * kv.head_dim  # keys and values
    assert runtime.fingerprint.dtype == "float32"  # the CPU compute dtype
    assert manifest.kv_bytes == manifest.fp16_bytes == 2 * elements  # was 4 * elements
    blob = (tmp_path / manifest.blob).stat().st_size
    assert 2 * elements < blob < 2 * elements + 20_000  # the tensors plus safetensors' header
    loaded = runtime.decompress(load_activation(tmp_path, runtime.fingerprint))
    assert loaded.dtype == torch.float32  # cast back to the runtime's dtype on loading
    assert torch.equal(loaded.keys[3], kv.keys[3].half().float())


def test_the_messages_a_cache_renders_are_kept_in_its_manifest(
    runtime: Runtime, four_bit: CompressedKV, tmp_path: Path
) -> None:
    messages = [{"role": "system", "content": "Caroline met Melanie. 🌻"}]
    saved = save_activation(tmp_path, four_bit, runtime.fingerprint, messages)
    assert saved.messages == tuple(messages) == read_manifest(tmp_path).messages
    compressed, manifest = runtime.open_activation(tmp_path)
    assert manifest.messages == tuple(messages) and manifest.bytes == saved.bytes
    assert compressed.spans == four_bit.spans
    save_activation(tmp_path, four_bit, runtime.fingerprint)  # as stored before messages were
    assert read_manifest(tmp_path).messages is None


def test_episodes_of_one_context_are_stored_as_one_activation(
    runtime: Runtime, kv: KVCache, four_bit: CompressedKV, tmp_path: Path
) -> None:
    other = runtime.compress(kv, SETTINGS["4-bit evicted"].model_copy(update={"budget_tokens": 40}))
    other = dataclasses.replace(other, settings=four_bit.settings)  # one compression for all
    metas = [{"centroid": [0.5, -0.5], "windows": [0, 2]}, {"centroid": [1.0, 0.0], "windows": [1]}]
    manifest = save_episodes(tmp_path, [four_bit, other], metas, runtime.fingerprint)
    caches, loaded = open_episodes(tmp_path, runtime.fingerprint)
    assert [c.kept for c in caches] == [72, 40] and manifest.kept_tokens == 72
    assert manifest.episodes is not None and loaded.episodes == manifest.episodes
    assert [(e.index, e.kept_tokens, e.meta) for e in manifest.episodes] == [
        (0, 72, metas[0]), (1, 40, metas[1])
    ]  # fmt: skip
    assert manifest.kv_bytes == four_bit.nbytes() + other.nbytes()
    assert manifest.bytes == loaded.bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    for ours, theirs in zip(caches, (four_bit, other), strict=True):
        assert ours.positions is not None and theirs.positions is not None
        assert torch.equal(ours.positions, theirs.positions)
        for a, b in zip(_stored_tensors(ours), _stored_tensors(theirs), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ActivationCorrupt, match="holds episodes"):
        open_activation(tmp_path, runtime.fingerprint)
    other_model = dataclasses.replace(runtime.fingerprint, weights_hash="f" * 32)
    with pytest.raises(ActivationMismatch):
        open_episodes(tmp_path, other_model)
    _flip_byte(tmp_path / manifest.blob, 1000)
    with pytest.raises(ActivationCorrupt, match="is corrupt"):
        open_episodes(tmp_path, runtime.fingerprint)
    plain = tmp_path / "plain"
    save_activation(plain, four_bit, runtime.fingerprint)
    with pytest.raises(ActivationCorrupt, match="holds no episodes"):
        open_episodes(plain, runtime.fingerprint)
