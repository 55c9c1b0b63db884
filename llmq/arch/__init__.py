"""Architecture registry: per-`model_type` data, one small file each."""

from __future__ import annotations

from . import gemma, llama, mistral, moe, phi3, qwen2, qwen3  # noqa: F401  (each registers its spec)
from .base import ArchSpec, ScaleGroup, get_arch, register, registered

__all__ = ["ArchSpec", "ScaleGroup", "get_arch", "register", "registered"]
