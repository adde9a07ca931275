"""Property-based fuzzing of every operation in `/openapi.json`, against a real `memos serve`.

Schemathesis draws requests from the daemon's own OpenAPI document: valid ones (positive) and
ones that break it (negative: wrong types, missing fields, no API key, ...). Every answer must
be no 5xx, with a status, content type, headers and body that the document declares for that
operation. Requests carry a real user's key (the admin key on admin routes) and real ids in
the path (a throwaway cube, memory or activation for a DELETE), so they reach the services
instead of stopping at 401 or 404.

The daemon runs with small generation and batch limits, which its document declares, so a
drawn request stays cheap: the run takes a minute or two on 2 cores. `derandomize` makes the
drawn requests the same on every run; `MEMOS_FUZZ_EXAMPLES` draws more per operation.
"""

from __future__ import annotations

import os
import re
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import DaemonProcess, make_daemon_process

EXAMPLES = int(os.environ.get("MEMOS_FUZZ_EXAMPLES", "12"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
ADMIN_PATHS = ("/v1/users", "/v1/jobs")


@dataclass
class Target:
    """A real daemon with one user who owns a cube holding a memory and an activation."""

    daemon: DaemonProcess
    key: str
    cube_id: str
    memory_id: str
    activation_id: str
    http: httpx.Client = field(repr=False)

    def fresh_cube(self) -> str:
        body = {"name": f"fuzz-{secrets.token_hex(4)}"}
        return str(self.http.post("/v1/cubes", json=body).raise_for_status().json()["id"])

    def fresh_memory(self) -> str:
        r = self.http.post(
            f"/v1/cubes/{self.cube_id}/memories", json={"items": [{"content": "to delete"}]}
        )
        return str(r.raise_for_status().json()["items"][0]["id"])

    def fresh_activation(self) -> str:
        r = self.http.post(f"/v1/cubes/{self.cube_id}/activations", json={"text": "short"})
        return str(r.raise_for_status().json()["id"])


@pytest.fixture(scope="module")
def target(tmp_path_factory, model_cache) -> Iterator[Target]:
    proc = make_daemon_process(
        tmp_path_factory.mktemp("fuzz"),
        MEMOS_ACTIVATIONS__MAX_GENERATE_TOKENS="4",
        MEMOS_ACTIVATIONS__MAX_TEXT_BYTES="2048",
        MEMOS_LIMITS__MAX_BATCH_ITEMS="8",
        MEMOS_LIMITS__MAX_TOP_K="20",
        MEMOS_RUNTIME__THREADS="1",
    )
    proc.start()
    try:
        with proc.client() as admin:
            key = admin.post("/v1/users", json={"name": "fuzzer"}).json()["api_key"]
        with proc.client(key) as http:
            cube_id = http.post("/v1/cubes", json={"name": "fuzz"}).json()["id"]
            items = [{"content": "Alice keeps bees in Lyon.", "session_id": "s1"}]
            memory_id = http.post(f"/v1/cubes/{cube_id}/memories", json={"items": items}).json()[
                "items"
            ][0]["id"]
            # The first activation loads the local model (converted once a session): minutes
            # on a busy 2-core machine.
            r = http.post(
                f"/v1/cubes/{cube_id}/activations", json={"session_id": "s1"}, timeout=900
            )
            assert r.status_code == 201 and r.json()["state"] == "ready", r.text
            yield Target(proc, key, cube_id, memory_id, r.json()["id"], http)
    finally:
        proc.stop()


def _substitute(case: Any, target: Target) -> None:
    """Real ids in the path; a throwaway resource for a DELETE, so later cases still find
    the shared ones."""
    path = case.path_parameters
    if not path:
        return
    deletes = case.method.upper() == "DELETE"
    if "cube_id" in path:
        last = case.path.rstrip("/").rsplit("/", 1)[-1]
        path["cube_id"] = target.fresh_cube() if deletes and last == "{cube_id}" else target.cube_id
    if "memory_id" in path:
        kept = not (deletes and case.path.endswith("{memory_id}"))
        path["memory_id"] = target.memory_id if kept else target.fresh_memory()
    if "activation_id" in path:
        path["activation_id"] = target.activation_id if not deletes else target.fresh_activation()


def _describe(failure: Failure) -> str:
    return f"{failure.title}: {failure.message}".strip()


def _fuzz(target: Target, mode: GenerationMode) -> tuple[list[str], dict[str, Counter[int]]]:
    """Problems found, and the statuses each operation answered."""
    schema = schemathesis.openapi.from_url(f"{target.daemon.url}/openapi.json")
    problems: dict[tuple[str, str], str] = {}
    statuses: dict[str, Counter[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        statuses[operation.label] = Counter()
        _fuzz_operation(target, operation, mode, problems, statuses[operation.label])
    return list(problems.values()), statuses


def _fuzz_operation(
    target: Target,
    operation: Any,
    mode: GenerationMode,
    problems: dict[tuple[str, str], str],
    statuses: Counter[int],
) -> None:
    key = target.daemon.admin_key if operation.path.startswith(ADMIN_PATHS) else target.key

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        _substitute(case, target)
        headers = {"Authorization": f"Bearer {key}"}
        response = case.call(headers=headers, timeout=120)
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Failure, FailureGroup) as exc:
            failures = exc.exceptions if isinstance(exc, FailureGroup) else (exc,)
            for failure in failures:
                problems.setdefault(
                    (operation.label, failure.title),
                    f"{operation.label} -> {response.status_code}: {_describe(failure)}\n"
                    f"    {case.as_curl_command()}\n    {response.text[:500]}",
                )

    try:
        run()
    except Unsatisfiable:  # nothing to break in an operation without parameters
        assert mode is GenerationMode.NEGATIVE, operation.label


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_as_its_openapi_declares(target, mode):
    problems, statuses = _fuzz(target, mode)
    for label, counts in statuses.items():
        print(f"{mode.value:8} {label:55} {dict(sorted(counts.items()))}")
    server_errors = "server error" in " ".join(problems).lower()
    tail = f"\n\ndaemon log:\n{target.daemon.log_tail()}" if server_errors else ""
    assert problems == [], "\n\n".join(problems) + tail


def test_default_max_tokens_fits_a_smaller_configured_limit(target):
    """Found by the fuzzer: with `max_generate_tokens` under 64, a generate without
    `max_tokens` (valid by the schema) was refused with 422 for the default of 64."""
    spec = httpx.get(f"{target.daemon.url}/openapi.json").json()
    max_tokens = spec["components"]["schemas"]["GenerateRequest"]["properties"]["max_tokens"]
    assert (max_tokens["default"], max_tokens["maximum"]) == (4, 4)
    r = target.http.post(f"/v1/cubes/{target.cube_id}/generate", json={"prompt": "Hello"})
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] in ("length", "stop")
    r = target.http.post(
        f"/v1/cubes/{target.cube_id}/generate", json={"prompt": "Hello", "max_tokens": 5}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_argument")


def test_a_completion_without_max_tokens_fits_a_smaller_configured_limit(target):
    """OpenAI's default of 16 for `/v1/completions` is cut to `max_generate_tokens` (4 here),
    as `generate`'s default is; the schema says so."""
    spec = httpx.get(f"{target.daemon.url}/openapi.json").json()
    props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert (props["max_tokens"]["default"], props["max_tokens"]["maximum"]) == (4, 4)
    model = props["model"]["examples"][0]
    r = target.http.post("/v1/completions", json={"model": model, "prompt": "Hello"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


def test_text_patterns_in_the_schema_match_what_the_daemon_accepts(target):
    """Found by the fuzzer: names, content, queries and prompts of only invisible characters,
    and text with NUL, were valid by the schema yet refused. The schema's `pattern` is the
    daemon's own rule now; checked here on the same strings over HTTP."""
    spec = httpx.get(f"{target.daemon.url}/openapi.json").json()
    pattern = re.compile(
        spec["components"]["schemas"]["CubeCreate"]["properties"]["name"]["pattern"]
    )
    samples = [
        "a",
        "\u200b",
        "\u200bz",
        "日本",
        "\u0301",
        "\ufeff\u2060",
        "a\x00",
        "\U000e0041",
        " ",
    ]
    for name in samples:
        r = target.http.post("/v1/cubes", json={"name": f"{name}"})
        allowed = pattern.search(name) is not None
        assert (r.status_code in (201, 409)) is allowed, (ascii(name), r.status_code, r.text)
