"""Domain errors of the runtime: caller mistakes and refused activations, each naming what is wrong.

The API layer maps `code` to an HTTP status in one place; nothing here knows about HTTP.
Broken invariants inside the package are `assert`s instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class KVRuntimeError(Exception):
    """Base class: `code` is a stable machine-readable name, `message` a readable sentence."""

    code = "kv_runtime_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KVRuntimeError):
    """A caller mistake: the message names the bad value and what is allowed."""

    code = "invalid_argument"


class ModelUnavailable(KVRuntimeError):
    """The configured model cannot be loaded (not installed, not cached, offline)."""

    code = "model_unavailable"


class ActivationMismatch(KVRuntimeError):
    """A stored activation was built by another model, tokenizer, chat template or dtype.

    `differences` maps each differing fingerprint field to (stored, expected).
    """

    code = "activation_mismatch"

    def __init__(self, differences: Mapping[str, tuple[Any, Any]]) -> None:
        self.differences = dict(differences)
        parts = ", ".join(f"{k}: stored {a!r} != runtime {b!r}" for k, (a, b) in sorted(
            self.differences.items()
        ))  # fmt: skip
        super().__init__(f"activation was built for another model: {parts}")


class ActivationCorrupt(KVRuntimeError):
    """A stored activation is unreadable: missing, truncated, or its checksum does not match."""

    code = "activation_corrupt"


class Cancelled(KVRuntimeError):
    """The caller's cancel hook asked to stop (its client left) before the work ran."""

    code = "cancelled"
