"""Hybrid search over one cube: embed the query, ask the cube index, load the hits' rows."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select

from memcube.embedder import Embedder
from memcube.errors import InvalidArgument
from memcube.types import SearchFilters
from memos.db.engine import Database
from memos.db.models import Memory
from memos.services.cubes import CubeService
from memos.services.indexes import IndexRegistry
from memos.services.memories import memory_views
from memos.services.views import HitView, Principal, Role


@dataclass(frozen=True)
class SearchResult:
    hits: list[HitView]
    took_ms: float


class SearchService:
    def __init__(
        self,
        db: Database,
        cubes: CubeService,
        indexes: IndexRegistry,
        embedder: Embedder,
        max_top_k: int,
    ) -> None:
        self.db = db
        self.cubes = cubes
        self.indexes = indexes
        self.embedder = embedder
        self.max_top_k = max_top_k

    def search(
        self,
        principal: Principal,
        cube_id: str,
        query: str,
        top_k: int,
        filters: SearchFilters,
        mode: str = "hybrid",
        exact: bool = False,
    ) -> SearchResult:
        started = time.perf_counter()
        if not query.strip():
            raise InvalidArgument("query is empty")
        if not 1 <= top_k <= self.max_top_k:
            raise InvalidArgument(f"top_k is {top_k}; it must be between 1 and {self.max_top_k}")
        if filters.since and filters.until and filters.since >= filters.until:
            raise InvalidArgument("filters.since must be earlier than filters.until")
        self.cubes.require(principal, cube_id, Role.READER)
        index = self.indexes.get(cube_id)
        vector = self.embedder.embed_one(query)
        scored = index.search(vector, query, top_k, filters, mode=mode, exact=exact)
        with self.db.read() as s:
            rows = s.scalars(
                select(Memory).where(
                    Memory.seq.in_([hit.seq for hit in scored]), Memory.deleted_at.is_(None)
                )
            ).all()
            views = {row.seq: view for row, view in zip(rows, memory_views(s, rows), strict=True)}
        hits = [
            HitView(memory=views[hit.seq], score=hit.score, signals=hit.signals)
            for hit in scored
            if hit.seq in views  # deleted between the index lookup and the row fetch
        ]
        return SearchResult(hits=hits, took_ms=(time.perf_counter() - started) * 1000)
