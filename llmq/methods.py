"""The registered search methods: importing this module registers every one (`llmq.search.SEARCHES`)."""

from __future__ import annotations

from . import awq  # noqa: F401  (registers AWQSearch)
from .search import SEARCHES, LayerReport, Search, get_search, register_search

__all__ = ["SEARCHES", "LayerReport", "Search", "get_search", "register_search"]
