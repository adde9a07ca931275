"""The daemon's local model, loaded on first use and shared by every request.

Loading takes a few seconds (about 20 s the very first time, when the packaged GGUF model is
converted to safetensors in the data dir), so it happens when something first needs the model
rather than at start, and the daemon starts fast either way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kv_runtime import ModelUnavailable, Runtime, RuntimeConfig
from kv_runtime.model import resolve_source
from memcube.errors import Unavailable

log = logging.getLogger("memos.runtime")


@dataclass(frozen=True)
class ModelCard:
    """The local model as clients name it: `id` is what the runtime's fingerprint calls it."""

    id: str
    aliases: frozenset[str]  # other names a request may use (the configured `model`)
    created: int  # Unix seconds: when its files were last changed


class RuntimeHolder:
    def __init__(self, config: RuntimeConfig, enabled: bool = True) -> None:
        self.config = config
        self.enabled = enabled
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._runtime is not None

    def get(self) -> Runtime:
        """The loaded runtime. Raises Unavailable when it is disabled or cannot load."""
        runtime = self._runtime
        if runtime is not None:
            return runtime
        if not self.enabled:
            raise Unavailable("the local runtime is disabled (activations.enabled=false)")
        with self._lock:
            if self._runtime is None:
                try:
                    self._runtime = Runtime.load(self.config)
                except ModelUnavailable as exc:
                    raise Unavailable(exc.message, code="model_unavailable") from exc
                info = self._runtime.info
                log.info(
                    "runtime loaded",
                    extra={"fields": {"model": info.name, "device": info.device,
                                      "dtype": info.dtype}},
                )  # fmt: skip
            return self._runtime

    def card(self) -> ModelCard:
        """The model this daemon runs, known without loading it. Unavailable when the runtime
        is disabled or the model cannot be found."""
        if not self.enabled:
            raise Unavailable("the local runtime is disabled (activations.enabled=false)")
        try:
            source = resolve_source(self.config)
        except ModelUnavailable as exc:
            raise Unavailable(exc.message, code="model_unavailable") from exc
        path = source.directory / source.gguf_file if source.gguf_file else source.directory
        try:
            created = int(path.stat().st_mtime)
        except OSError:
            created = 0
        return ModelCard(source.name, frozenset({self.config.model}), created)

    def complete(self, messages: Sequence[dict[str, str]], max_tokens: int = 200) -> str:
        """Chat messages -> the model's greedy reply (the `llm` enricher's runtime backend)."""
        runtime = self.get()
        prompt = runtime.render_chat(messages)
        return runtime.generate(prompt, max_tokens=max_tokens).collect().text
