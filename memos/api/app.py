"""The FastAPI application: routers, error mapping, middleware, daemon lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Route

from memos import __version__
from memos.api import docs, errors, openapi
from memos.api.activation_metrics import ActivationCollector
from memos.api.cache_metrics import CacheCollector
from memos.api.fleet_metrics import FleetCollector
from memos.api.lifecycle_metrics import LifecycleCollector
from memos.api.mcp_http import PATH, McpEndpoint
from memos.api.middleware import Metrics, RequestMiddleware
from memos.api.routes import (
    activations,
    chats,
    cubes,
    keys,
    memories,
    openai,
    ops,
    policies,
    users,
)
from memos.daemon import Daemon


def create_app(daemon: Daemon) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        daemon.start()
        try:
            async with mcp.running():
                yield
        finally:
            daemon.stop()

    app = FastAPI(
        title="memosd",
        version=__version__,
        summary="A memory operating system daemon for LLM apps.",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by `docs.install`
        redoc_url=None,
    )
    app.state.daemon = daemon
    app.state.metrics = Metrics()
    app.state.metrics.registry.register(ActivationCollector(daemon.activations.stats))
    app.state.metrics.registry.register(CacheCollector(daemon))
    app.state.metrics.registry.register(FleetCollector(daemon))
    app.state.metrics.registry.register(
        LifecycleCollector(daemon.evictor, daemon.fuser, daemon.jobs, daemon.migrator)
    )
    errors.install(app)
    for module in (ops, users, keys, cubes, policies, memories, activations, chats, openai):
        app.include_router(module.router)
    openapi.install(app, daemon.settings)
    docs.install(app)
    mcp = McpEndpoint(app, daemon)
    app.router.routes.append(
        Route(PATH, mcp, methods=["GET", "POST", "DELETE"], include_in_schema=False)
    )
    app.add_middleware(
        RequestMiddleware,
        metrics=app.state.metrics,
        max_body_bytes=daemon.settings.limits.max_body_bytes,
    )
    return app
