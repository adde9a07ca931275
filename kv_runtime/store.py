"""Persisting activations: one safetensors blob plus a JSON manifest per directory. No pickle.

    <dir>/manifest.json            fingerprint, token ids, the chat messages they render (so a
                                   continuation is rendered after the real history, see
                                   `kv_runtime.template`), spans, compression, sizes, checksums
    <dir>/kv-<blake2b>.safetensors the tensors (codes, scales, minimums, unquantized spans,
                                   positions when tokens were evicted)

Writes are atomic: the blob is written under a temporary name, fsynced, renamed, then the
manifest the same way, and the directory is fsynced after each rename. The manifest names its
blob, so until the new manifest is renamed into place the old manifest and its blob are intact:
a crash leaves either the old activation or the new one. Older blobs are removed afterwards.

Loading checks, in order: the manifest parses and matches its own checksum, its fingerprint
equals the runtime's (else `ActivationMismatch`), the blob's size and blake2b match the manifest
(else `ActivationCorrupt`); only then are the tensors parsed, from the very bytes that were hashed.

An episodic activation (EpiCache) is several caches of one context, each kept under its own
budget: one blob holds them all (tensors named `episodes.<i>.layers...`), and the manifest
(format `memosd-episodic/1`) lists per episode its spans, sizes and what the caller recorded
with it (its centroid, its windows). `save_episodes` / `open_episodes` write and read it, with
the same atomicity and checks; `open_activation` refuses it (there is no one cache to load).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

import kernels
from kv_runtime.compress import CompressedKV, CompressedLayer
from kv_runtime.config import CompressionConfig
from kv_runtime.errors import ActivationCorrupt, ActivationMismatch
from kv_runtime.model import Fingerprint
from memcube.atomic import fsync_dir, write_atomic

FORMAT = "memosd-activation/1"
EPISODIC_FORMAT = "memosd-episodic/1"
MANIFEST = "manifest.json"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16)}
_SPANS = ("sink_keys", "sink_values", "residual_keys", "residual_values")


@dataclass(frozen=True)
class EpisodeManifest:
    """One episode's cache in an episodic activation, without its tensors."""

    index: int
    kept_tokens: int
    kv_bytes: int
    fp16_bytes: int
    meta: Mapping[str, Any]  # what the caller stored with it (JSON)


@dataclass(frozen=True)
class ActivationManifest:
    """What a stored activation is, without its tensors. For an episodic one `kept_tokens` is
    the most any one episode keeps and `kv_bytes` / `fp16_bytes` are summed over them."""

    fingerprint: Fingerprint
    token_ids: tuple[int, ...]
    kept_tokens: int
    compression: CompressionConfig
    bytes: int  # blob + manifest on disk
    kv_bytes: int  # the tensors themselves
    fp16_bytes: int  # the kept keys and values in float16, for comparison
    blob: str
    blob_blake2b: str
    # The chat messages whose rendering `token_ids` are; None for activations stored before
    # they were recorded.
    messages: tuple[Mapping[str, str], ...] | None = None
    episodes: tuple[EpisodeManifest, ...] | None = None  # None: a plain activation

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


def _blake2b(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _tensors(compressed: CompressedKV, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(compressed.layers):
        for name, tensor in layer.stored().items():
            out[f"{prefix}layers.{i}.{name}"] = tensor.detach().cpu().contiguous()
    if compressed.positions is not None:
        out[f"{prefix}positions"] = compressed.positions.to(torch.int32).contiguous()
    return out


def _cache_body(compressed: CompressedKV) -> dict[str, Any]:
    """What the manifest says of one cache: its spans, settings and sizes."""
    sink, span, residual = compressed.spans
    return {
        "kept_tokens": compressed.kept,
        "spans": {"sink": sink, "quantized": span, "residual": residual},
        "compression": compressed.settings.model_dump(),
        "evicted": compressed.positions is not None,
        "kv_bytes": compressed.nbytes(),
        "fp16_bytes": compressed.fp16_nbytes(),
    }


def _manifest_body(body: dict[str, Any]) -> bytes:
    """The manifest with a checksum over the rest of it (canonical JSON)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({**body, "manifest_blake2b": _blake2b(canonical)}, indent=1).encode()


def save_activation(
    directory: Path,
    compressed: CompressedKV,
    fingerprint: Fingerprint,
    messages: Sequence[Mapping[str, str]] | None = None,
) -> ActivationManifest:
    """Store `compressed` in `directory` atomically, replacing what was there. `messages`:
    the chat messages its tokens render, if they came from the chat template."""
    assert fingerprint.dtype == str(compressed.dtype).removeprefix("torch."), "dtype mismatch"
    body = {
        "format": FORMAT,
        "fingerprint": fingerprint.to_dict(),
        "token_ids": list(compressed.token_ids),
        **_cache_body(compressed),
        "dtype": fingerprint.dtype,
    }
    return _write(directory, _tensors(compressed), body, messages)


def save_episodes(
    directory: Path,
    caches: Sequence[CompressedKV],
    metas: Sequence[Mapping[str, Any]],
    fingerprint: Fingerprint,
    messages: Sequence[Mapping[str, str]] | None = None,
    token_ids: Sequence[int] | None = None,
) -> ActivationManifest:
    """Store the caches of one context's episodes as one activation, atomically; `metas[i]`
    (JSON) is kept with episode i and read back as `EpisodeManifest.meta`. `token_ids`: the
    context's (default: the first cache's); a cache whose own ids differ (one re-positioned
    to 0..kept-1, see `kv_runtime.episodic`) keeps them in its episode's entry."""
    assert caches and len(caches) == len(metas), "one meta per episode, at least one episode"
    first = caches[0]
    context = tuple(int(t) for t in (first.token_ids if token_ids is None else token_ids))
    assert all(c.settings == first.settings for c in caches), "one compression for all"
    assert fingerprint.dtype == str(first.dtype).removeprefix("torch."), "dtype mismatch"
    tensors: dict[str, torch.Tensor] = {}
    episodes = []
    for i, (cache, meta) in enumerate(zip(caches, metas, strict=True)):
        tensors.update(_tensors(cache, f"episodes.{i}."))
        own = {} if cache.token_ids == context else {"token_ids": list(cache.token_ids)}
        episodes.append({"index": i, **_cache_body(cache), **own, "meta": dict(meta)})
    body = {
        "format": EPISODIC_FORMAT,
        "fingerprint": fingerprint.to_dict(),
        "token_ids": list(context),
        "kept_tokens": max(c.kept for c in caches),
        "compression": first.settings.model_dump(),
        "dtype": fingerprint.dtype,
        "kv_bytes": sum(c.nbytes() for c in caches),
        "fp16_bytes": sum(c.fp16_nbytes() for c in caches),
        "episodes": episodes,
    }
    return _write(directory, tensors, body, messages)


def _write(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    body: dict[str, Any],
    messages: Sequence[Mapping[str, str]] | None,
) -> ActivationManifest:
    """The blob, then the manifest naming it (see the module docstring for the order)."""
    directory.mkdir(parents=True, exist_ok=True)
    blob_bytes = save_tensors(tensors)
    checksum = _blake2b(blob_bytes)
    blob = f"kv-{checksum}.safetensors"
    write_atomic(directory / blob, blob_bytes)
    body = {**body, "blob": blob, "blob_bytes": len(blob_bytes), "blob_blake2b": checksum}
    if messages is not None:
        body["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    manifest_bytes = _manifest_body(body)
    previous = _current_blob(directory)
    try:
        write_atomic(directory / MANIFEST, manifest_bytes)
    except BaseException:
        if blob != previous:  # the old manifest still names the old blob; drop the new one
            (directory / blob).unlink(missing_ok=True)
        raise
    for stale in directory.glob("kv-*.safetensors"):
        if stale.name != blob:
            stale.unlink(missing_ok=True)
    return _to_manifest(body, len(blob_bytes) + len(manifest_bytes))


def _current_blob(directory: Path) -> str | None:
    """The blob the manifest in `directory` names now, if it can be read."""
    try:
        return str(json.loads((directory / MANIFEST).read_bytes())["blob"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def delete_activation(directory: Path) -> None:
    """Remove an activation: the manifest first (it stops existing atomically), then the rest."""
    if not directory.is_dir():
        return
    (directory / MANIFEST).unlink(missing_ok=True)
    fsync_dir(directory)
    for path in directory.iterdir():
        path.unlink(missing_ok=True)
    directory.rmdir()


def _read_body(directory: Path) -> tuple[dict[str, Any], int]:
    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ActivationCorrupt(f"no activation in {directory}: {MANIFEST} is missing") from None
    try:
        body = json.loads(raw)
        claimed = body.pop("manifest_blake2b")
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ActivationCorrupt(f"{path} is not a readable manifest: {exc}") from exc
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    if _blake2b(canonical) != claimed:
        raise ActivationCorrupt(f"{path} does not match its checksum")
    if body.get("format") not in (FORMAT, EPISODIC_FORMAT):
        raise ActivationCorrupt(f"{path} has format {body.get('format')!r}; expected {FORMAT!r}")
    return body, len(raw)


def _to_manifest(body: dict[str, Any], total_bytes: int) -> ActivationManifest:
    try:
        return ActivationManifest(
            fingerprint=Fingerprint.from_dict(body["fingerprint"]),
            token_ids=tuple(int(t) for t in body["token_ids"]),
            kept_tokens=int(body["kept_tokens"]),
            compression=CompressionConfig.model_validate(body["compression"]),
            bytes=total_bytes,
            kv_bytes=int(body["kv_bytes"]),
            fp16_bytes=int(body["fp16_bytes"]),
            blob=str(body["blob"]),
            blob_blake2b=str(body["blob_blake2b"]),
            messages=_messages(body.get("messages")),
            episodes=_episodes(body) if body["format"] == EPISODIC_FORMAT else None,
        )
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise ActivationCorrupt(f"manifest is missing or has a bad field: {exc}") from exc


def _episodes(body: dict[str, Any]) -> tuple[EpisodeManifest, ...]:
    episodes = tuple(
        EpisodeManifest(
            index=int(e["index"]),
            kept_tokens=int(e["kept_tokens"]),
            kv_bytes=int(e["kv_bytes"]),
            fp16_bytes=int(e["fp16_bytes"]),
            meta=dict(e["meta"]),
        )
        for e in body["episodes"]
    )
    if not episodes or [e.index for e in episodes] != list(range(len(episodes))):
        raise ValueError("episodes must be numbered 0, 1, ... and there must be one at least")
    return episodes


def _messages(raw: Any) -> tuple[dict[str, str], ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in raw
    ):
        raise ValueError("messages must be a list of {role, content} strings")
    return tuple({"role": m["role"], "content": m["content"]} for m in raw)


def read_manifest(directory: Path) -> ActivationManifest:
    """The manifest of the activation in `directory` (checked against its own checksum)."""
    body, size = _read_body(directory)
    blob = directory / str(body.get("blob", ""))
    return _to_manifest(body, size + (blob.stat().st_size if blob.is_file() else 0))


def load_activation(directory: Path, expected: Fingerprint) -> CompressedKV:
    """Load and verify the activation in `directory` for a runtime with fingerprint `expected`.

    Raises ActivationMismatch when it was built for another model/tokenizer/template/dtype,
    ActivationCorrupt when the manifest or blob is missing, truncated or altered.
    """
    return open_activation(directory, expected)[0]


def open_activation(
    directory: Path, expected: Fingerprint
) -> tuple[CompressedKV, ActivationManifest]:
    """`load_activation`, with the manifest it was read with."""
    tensors, body, manifest = _open(directory, expected)
    if manifest.episodes is not None:
        raise ActivationCorrupt(f"{directory} holds episodes; open it with open_episodes")
    return _checked_rebuild(directory, tensors, body, manifest, ""), manifest


def open_episodes(
    directory: Path, expected: Fingerprint
) -> tuple[tuple[CompressedKV, ...], ActivationManifest]:
    """Load and verify an episodic activation (see `save_episodes`): its caches, in episode
    order, and its manifest. The same refusals as `load_activation`."""
    tensors, body, manifest = _open(directory, expected)
    if manifest.episodes is None:
        raise ActivationCorrupt(f"{directory} holds no episodes; open it with open_activation")
    caches = tuple(
        _checked_rebuild(directory, tensors, {**body, **e}, manifest, f"episodes.{i}.")
        for i, e in enumerate(body["episodes"])
    )
    for cache, episode in zip(caches, manifest.episodes, strict=True):
        if cache.kept != episode.kept_tokens:
            raise ActivationCorrupt(
                f"episode {episode.index} of {directory} keeps {cache.kept} entries; its "
                f"manifest says {episode.kept_tokens}"
            )
    return caches, manifest


def _open(
    directory: Path, expected: Fingerprint
) -> tuple[dict[str, torch.Tensor], dict[str, Any], ActivationManifest]:
    """The checked manifest and the tensors of the blob it names, not yet assembled."""
    body, size = _read_body(directory)
    manifest = _to_manifest(body, size)
    differences = manifest.fingerprint.differences(expected)
    if differences:
        raise ActivationMismatch(differences)
    path = directory / manifest.blob
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ActivationCorrupt(f"blob {path} named by the manifest is missing") from None
    if len(data) != body.get("blob_bytes") or _blake2b(data) != manifest.blob_blake2b:
        raise ActivationCorrupt(
            f"blob {path} is corrupt: {len(data)} bytes, expected {body.get('blob_bytes')}, "
            "or its checksum differs"
        )
    try:
        tensors = load_tensors(data)
    except (KeyError, ValueError) as exc:
        raise ActivationCorrupt(f"blob {path} does not hold what its manifest says: {exc}") from exc
    return tensors, body, dataclasses.replace(manifest, bytes=size + len(data))


def _checked_rebuild(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    body: dict[str, Any],
    manifest: ActivationManifest,
    prefix: str,
) -> CompressedKV:
    try:
        return _rebuild(tensors, body, manifest, prefix)
    except (KeyError, ValueError, TypeError, ValidationError, kernels.QuantizationError) as exc:
        raise ActivationCorrupt(
            f"blob in {directory} does not hold what its manifest says: {exc}"
        ) from exc


def _rebuild(
    tensors: dict[str, torch.Tensor],
    body: dict[str, Any],
    manifest: ActivationManifest,
    prefix: str = "",
) -> CompressedKV:
    """One cache from its tensors (names under `prefix`) and its manifest entry `body`."""
    settings = CompressionConfig.model_validate(body["compression"])
    fp = manifest.fingerprint
    dtype = _DTYPES[fp.dtype]
    value_group = min(settings.value_group_size, fp.head_dim)
    quantized = int(body["spans"]["quantized"])
    layers = []
    for i in range(fp.layers):
        spans = {name: tensors[f"{prefix}layers.{i}.{name}"] for name in _SPANS}
        q: dict[str, kernels.Quantized | None] = {"keys": None, "values": None}
        if quantized:
            shape = (1, fp.kv_heads, quantized, fp.head_dim)
            for name, axis, group in (("keys", "channel", settings.group_size),
                                      ("values", "token", value_group)):  # fmt: skip
                q[name] = kernels.Quantized(
                    packed=tensors[f"{prefix}layers.{i}.{name}.packed"],
                    scale=tensors[f"{prefix}layers.{i}.{name}.scale"].float(),
                    minimum=tensors[f"{prefix}layers.{i}.{name}.minimum"].float(),
                    bits=settings.bits,
                    group_size=group,
                    axis=axis,  # type: ignore[arg-type]
                    shape=shape,
                    dtype=dtype,
                )
        layers.append(CompressedLayer(keys=q["keys"], values=q["values"], **spans))
    positions = tensors[f"{prefix}positions"].to(torch.int64) if body["evicted"] else None
    compressed = CompressedKV(
        layers=tuple(layers),
        token_ids=tuple(int(t) for t in body["token_ids"]),
        positions=positions,
        settings=settings,
        dtype=dtype,
        kv_heads=fp.kv_heads,
        head_dim=fp.head_dim,
    )
    if compressed.kept != int(body["kept_tokens"]):
        raise ValueError(f"{compressed.kept} entries stored, manifest says {body['kept_tokens']}")
    return compressed
