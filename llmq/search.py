"""The per-layer search step: what runs on a decoder layer before its weights are encoded.

A search may rescale, clip or otherwise rewrite the layer's weights in place (keeping the FP
function of the model), and reports what it did. Round-to-nearest does nothing; the AWQ search
plugs in here with ``needs_activations = True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from torch import nn

from .arch import ArchSpec
from .errors import FormatError

if TYPE_CHECKING:
    from .activations import InputStats
    from .encoding import Target


@dataclass
class LayerReport:
    """What a search did to one layer (a JSON-friendly ``details`` dict).

    ``importance`` maps a linear (name relative to the layer) to the per-column importance its
    encoder must use, or None for round-to-nearest; it is not part of the JSON report.
    """

    layer: int
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    importance: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "method": self.method, **self.details}

    def line(self) -> str:
        """One log line: each scale group's loss before/after and alpha, the mean clip ratio."""
        parts = []
        for g in self.details.get("scales", []):
            if "loss_before" in g:
                alpha = "none" if g.get("fallback") else f"{g['alpha']:.2f}"
                parts.append(
                    f"{g['prev']}: loss {g['loss_before']:.4g} -> {g['loss_after']:.4g} (alpha {alpha})"
                )
        clips = self.details.get("clip", {})
        if clips:
            ratios = [c["mean_ratio"] for c in clips.values()]
            parts.append(f"clip mean ratio {sum(ratios) / len(ratios):.3f}")
        return "; ".join(parts)


class Search(Protocol):
    """Interface of a search step."""

    name: str
    # whether the pipeline must capture this layer's calibration inputs for it
    needs_activations: bool

    def run(
        self,
        layer: nn.Module,
        index: int,
        stats: dict[str, InputStats] | None,
        targets: dict[str, Target],
        arch: ArchSpec,
    ) -> LayerReport: ...


SEARCHES: dict[str, type] = {}


def register_search(cls: type) -> type:
    """Class decorator: register a search method under its ``name`` (``llmq.methods`` imports them all)."""
    assert cls.name not in SEARCHES, cls.name
    SEARCHES[cls.name] = cls
    return cls


@register_search
class RoundToNearest:
    """No search: each weight is rounded to the nearest level of its group's grid."""

    name = "rtn"
    needs_activations = False

    def run(
        self,
        layer: nn.Module,
        index: int,
        stats: dict[str, InputStats] | None,
        targets: dict[str, Target],
        arch: ArchSpec,
    ) -> LayerReport:
        return LayerReport(index, self.name)


def get_search(method: str, config: Any = None) -> Search:
    """The registered search named ``method``, built with its ``config`` (e.g. `AWQConfig`) if given."""
    cls = SEARCHES.get(method)
    if cls is None:
        raise FormatError(f"method {method!r}: choose one of {', '.join(SEARCHES)}")
    return cls(config) if config is not None else cls()
