"""ASGI middleware: request size limit, one structured log line per request, Prometheus metrics."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

log = logging.getLogger("memos.access")

Scope = dict[str, Any]


class Metrics:
    """Per-app registry, so several daemons in one process (tests) keep separate counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "memos_requests_total",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "memos_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route"],
            buckets=(0.002, 0.005, 0.01, 0.015, 0.025, 0.04, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


async def _send_error(send: Any, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _as_json_request(scope: Scope) -> Scope:
    """Every body this API takes is JSON, so read it as JSON whatever the client declared.

    `curl -d '{...}'` labels its body `application/x-www-form-urlencoded`; refusing that would
    fail the most common first request for no gain. A body that is not JSON still gets 400.
    """
    headers = scope.get("headers") or []
    content_type = dict(headers).get(b"content-type", b"")
    if b"json" in content_type or scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return scope
    kept = [(k, v) for k, v in headers if k != b"content-type"]
    return {**scope, "headers": [*kept, (b"content-type", b"application/json")]}


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The whole request body, or None once it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that hands the buffered body over once, then defers to the real one."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class RequestMiddleware:
    """Rejects bodies over `max_body_bytes` with 413, then logs and measures every request."""

    def __init__(self, app: Any, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope = _as_json_request(scope)
        status = 500
        limit = self.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, 413, "payload_too_large", f"request body over {limit} bytes")
            self._record(scope, 413, started)
            return
        if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # A chunked body has no declared size: read it here, up to the limit, so an
            # oversize one gets 413 before any parser sees it (FastAPI would answer 400).
            body = await _read_body(receive, limit)
            if body is None:
                await _send_error(
                    send, 413, "payload_too_large", f"request body over {limit} bytes"
                )
                self._record(scope, 413, started)
                return
            receive = _replay(body, receive)

        async def tracking_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            status = 500  # the server error handler outside answers; count and log it here
            raise
        finally:
            self._record(scope, status, started)

    def _record(self, scope: Scope, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        self.metrics.requests.labels(method, template, str(status)).inc()
        self.metrics.latency.labels(method, template).observe(elapsed)
        client = scope.get("client")
        log.info(
            "request",
            extra={
                "fields": {
                    "method": method,
                    "path": scope.get("path"),
                    "route": template,
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 2),
                    "client": client[0] if client else None,
                }
            },
        )
