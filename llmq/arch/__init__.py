"""Architecture registry: per-`model_type` data, one small file each."""

from __future__ import annotations

from . import llama  # noqa: F401  (registers the spec)
from .base import ArchSpec, ScaleGroup, get_arch, register, registered

__all__ = ["ArchSpec", "ScaleGroup", "get_arch", "register", "registered"]
