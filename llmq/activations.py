"""Calibration activations flowing through the decoder layers, one mini-batch in memory at a time.

The hidden states of all calibration windows live in a temporary file, read and written with
positioned I/O (not a memory map, whose touched pages would count as resident), so peak memory
holds one mini-batch however many samples are asked for.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .arch import ArchSpec


class ActivationStore:
    """``(n_samples, seqlen, hidden)`` float32 activations on disk, accessed by mini-batch.

    Args:
        n_samples: number of calibration windows.
        seqlen: tokens per window.
        hidden: hidden size.
        batch_size: windows per mini-batch.
        directory: where the temporary file goes (default: the system temp dir).

    Example:
        >>> store = ActivationStore(128, 512, 576, batch_size=8)
        >>> store.write(0, hidden_states_of_batch_0)
        >>> x = store.read(0)
    """

    def __init__(
        self, n_samples: int, seqlen: int, hidden: int, *, batch_size: int, directory: str | None = None
    ) -> None:
        self.n_samples, self.seqlen, self.hidden, self.batch_size = n_samples, seqlen, hidden, batch_size
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115  (lives as long as the store; deleted on close or crash)
        self._row = seqlen * hidden * 4
        os.ftruncate(self._file.fileno(), n_samples * self._row)

    def __len__(self) -> int:
        return (self.n_samples + self.batch_size - 1) // self.batch_size

    def _span(self, i: int) -> tuple[int, int]:
        start = i * self.batch_size
        return start, min(start + self.batch_size, self.n_samples)

    def write(self, i: int, x: torch.Tensor) -> None:
        start, stop = self._span(i)
        assert tuple(x.shape) == (stop - start, self.seqlen, self.hidden), (tuple(x.shape), start, stop)
        data = x.detach().to(torch.float32).contiguous().numpy().tobytes()
        os.pwrite(self._file.fileno(), data, start * self._row)

    def read(self, i: int) -> torch.Tensor:
        start, stop = self._span(i)
        data = os.pread(self._file.fileno(), (stop - start) * self._row, start * self._row)
        return torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy()).view(
            stop - start, self.seqlen, self.hidden
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self.read(i)

    def close(self) -> None:
        self._file.close()


class LayerRunner:
    """Runs transformers decoder layers on calibration mini-batches (causal, rotary positions)."""

    def __init__(self, config: Any, arch: ArchSpec) -> None:
        rotary = arch.rotary_class()
        self.rotary = rotary(config) if rotary is not None else None

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Output of ``layer`` for hidden states ``x`` of shape ``(batch, seqlen, hidden)``."""
        batch, seqlen, _ = x.shape
        positions = torch.arange(seqlen).unsqueeze(0).expand(batch, -1)
        # an explicit additive causal mask: correct under every attention backend
        mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)[None, None].expand(batch, 1, -1, -1)
        kwargs: dict[str, Any] = {"attention_mask": mask.to(x.dtype), "position_ids": positions}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(x, positions)
        with torch.no_grad():
            out = layer(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def embed(tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Input of the first decoder layer: embedding rows of ``tokens``, in float32."""
    return embedding[tokens].to(torch.float32)
