"""MCP over streamable HTTP at `/mcp` on the daemon, acting with each request's API key.

The tools are `memos.mcp_server`'s (the same as `memos mcp` on stdio). A request without a
valid key gets the daemon's 401 before MCP sees it; a tool call then goes through the REST
API in process (`httpx.ASGITransport`, no socket) with that request's key, so it meets the same
authorization, validation, rate limits and queues as a REST call. Stateless: no MCP session is
kept between requests, so nothing grows with the number of clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio.to_thread
import httpx
from mcp.server.mcpserver import Context
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from memos.api.errors import mapped_response
from memos.client import AsyncMemosClient
from memos.daemon import Daemon
from memos.mcp_server import build_server

PATH = "/mcp"
IN_PROCESS_URL = "http://memosd.in-process"  # never resolved: the transport is the app itself


def _bearer(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


class McpEndpoint:
    """The ASGI endpoint at `/mcp`; `running()` belongs in the app's lifespan."""

    def __init__(self, app: ASGIApp, daemon: Daemon) -> None:
        self._app = app
        self._daemon = daemon
        self._server = build_server(self._caller)
        # The key is what protects the endpoint (a rebinding page cannot send it), and the
        # daemon may be reached by any name it is served under: no Host allow-list.
        self._server.streamable_http_app(
            streamable_http_path=PATH,
            stateless_http=True,
            json_response=True,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self._mcp = StreamableHTTPASGIApp(self._server.session_manager)

    def running(self) -> AbstractAsyncContextManager[None]:
        return self._server.session_manager.run()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = _bearer(Request(scope))
        try:
            await anyio.to_thread.run_sync(self._daemon.auth.authenticate, key)
        except Exception as exc:
            if (refused := mapped_response(exc)) is None:
                raise
            await refused(scope, receive, send)
            return
        await self._mcp(scope, receive, send)

    @asynccontextmanager
    async def _caller(self, ctx: Context) -> AsyncIterator[AsyncMemosClient]:
        request = ctx.request_context.request
        assert isinstance(request, Request), "the HTTP transport attaches its request"
        transport = httpx.ASGITransport(app=self._app)
        async with AsyncMemosClient(
            IN_PROCESS_URL, api_key=_bearer(request), timeout=None, transport=transport
        ) as sdk:
            yield sdk
