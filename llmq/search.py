"""The per-layer search step: what runs on a decoder layer before its weights are encoded.

A search may rescale, clip or otherwise rewrite the layer's weights in place (keeping the FP
function of the model), and reports what it did. Round-to-nearest does nothing; the AWQ search
plugs in here with ``needs_activations = True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .arch import ArchSpec
from .config import QuantConfig
from .errors import FormatError


@dataclass
class LayerReport:
    """What a search did to one layer (a JSON-friendly ``details`` dict)."""

    layer: int
    method: str
    details: dict[str, Any] = field(default_factory=dict)


class Search(Protocol):
    """Interface of a search step."""

    name: str
    # whether the pipeline must capture this layer's calibration inputs for it
    needs_activations: bool

    def run(
        self, layer: nn.Module, index: int, inputs: torch.Tensor | None, arch: ArchSpec, cfg: QuantConfig
    ) -> LayerReport: ...


class RoundToNearest:
    """No search: each weight is rounded to the nearest level of its group's grid."""

    name = "rtn"
    needs_activations = False

    def run(
        self, layer: nn.Module, index: int, inputs: torch.Tensor | None, arch: ArchSpec, cfg: QuantConfig
    ) -> LayerReport:
        return LayerReport(index, self.name)


SEARCHES: dict[str, type] = {"rtn": RoundToNearest}


def get_search(method: str) -> Search:
    if method not in SEARCHES:
        raise FormatError(f"--method {method}: choose one of {', '.join(SEARCHES)}")
    return SEARCHES[method]()
