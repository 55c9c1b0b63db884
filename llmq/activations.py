"""Calibration activations flowing through the decoder layers, one mini-batch in memory at a time.

The hidden states of all calibration windows live in a temporary file, read and written with
positioned I/O (not a memory map, whose touched pages would count as resident), so peak memory
holds one mini-batch however many samples are asked for.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .arch import ArchSpec
from .arch.base import Experts
from .errors import LlmqError
from .precision import CPU_MATMUL, matmul_precision, resolve_dtype

if TYPE_CHECKING:
    from .calib import Calibration
    from .source import Checkpoint


COPY_BYTES = 1 << 24


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
        data = x.detach().to(torch.float32).contiguous().numpy()
        os.pwrite(self._file.fileno(), memoryview(data).cast("B"), start * self._row)  # no bytes copy

    def read(self, i: int) -> torch.Tensor:
        start, stop = self._span(i)
        out = torch.empty(stop - start, self.seqlen, self.hidden, dtype=torch.float32)
        view = memoryview(out.numpy()).cast("B")  # read straight into the tensor
        done = os.preadv(self._file.fileno(), [view], start * self._row)
        if done != view.nbytes:
            raise LlmqError(
                f"activation file: read {done} of {view.nbytes} bytes of windows {start}-{stop - 1}"
            )
        return out

    def save(self, path: Path) -> None:
        """Copy every window's activations to ``path``, flushed to disk."""
        with open(path, "wb") as dst:
            for offset in range(0, self.n_samples * self._row, COPY_BYTES):
                dst.write(os.pread(self._file.fileno(), COPY_BYTES, offset))
            dst.flush()
            os.fsync(dst.fileno())

    def load(self, path: Path) -> None:
        """Replace every window's activations by those `save` wrote to ``path``."""
        if path.stat().st_size != self.n_samples * self._row:
            raise LlmqError(f"{path}: {path.stat().st_size} bytes, not this calibration's activations")
        with open(path, "rb") as src:
            for offset in range(0, self.n_samples * self._row, COPY_BYTES):
                os.pwrite(self._file.fileno(), src.read(COPY_BYTES), offset)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self.read(i)

    def close(self) -> None:
        self._file.close()


class LayerRunner:
    """Runs transformers decoder layers on calibration mini-batches (causal, rotary positions).

    ``forward_dtype`` ``bfloat16`` runs the layers' products under autocast (`CalibConfig.forward_dtype`);
    the statistics' own products stay float32.
    """

    def __init__(
        self, config: Any, arch: ArchSpec, device: str | torch.device = "cpu", forward_dtype: str = "float32"
    ) -> None:
        rotary = arch.rotary_class()
        self.device = torch.device(device)
        self.autocast = resolve_dtype(forward_dtype, self.device) == "bfloat16"
        self.rotary = rotary(config).to(self.device) if rotary is not None else None
        # one rotary module for several layer types (Gemma 3: local and global bases) takes the type
        self.typed_rotary = (
            self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters
        )

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Output of ``layer`` (already on the runner's device) for hidden states ``x`` ``(batch, seqlen, hidden)``.

        Returns the output on the CPU.
        """
        x = x.to(self.device)
        batch, seqlen, _ = x.shape
        positions = torch.arange(seqlen, device=self.device).unsqueeze(0).expand(batch, -1)
        attn = getattr(layer, "self_attn", None)
        kwargs: dict[str, Any] = {"attention_mask": self.mask(seqlen, getattr(attn, "sliding_window", None))}
        kwargs["attention_mask"] = kwargs["attention_mask"].expand(batch, 1, -1, -1).to(x.dtype)
        kwargs["position_ids"] = positions
        if self.typed_rotary:
            kwargs["position_embeddings"] = self.rotary(x, positions, getattr(attn, "layer_type", None))
        elif self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(x, positions)
        with (
            torch.no_grad(),
            matmul_precision(CPU_MATMUL if self.device.type == "cpu" else None),
            torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast),
        ):
            out = layer(x, **kwargs)  # the capture hooks' Gram products run inside, at matmul_precision
        out = out[0] if isinstance(out, tuple) else out
        return out.to(x.dtype).cpu()

    def mask(self, seqlen: int, window: int | None = None) -> torch.Tensor:
        """An explicit additive causal mask ``(1, 1, seqlen, seqlen)`` (correct under every attention
        backend); a sliding-window layer also masks keys ``window`` or more positions back."""
        i = torch.arange(seqlen, device=self.device)
        hidden = i[None, :] > i[:, None]
        if window is not None and window < seqlen:
            hidden |= i[:, None] - i[None, :] >= window
        return torch.zeros(seqlen, seqlen, device=self.device).masked_fill(hidden, float("-inf"))[None, None]


def embed(tokens: torch.Tensor, embedding: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Input of the first decoder layer: embedding rows of ``tokens`` in float32, times ``scale``
    (`ArchSpec.embed_multiplier`: Gemma's sqrt(hidden))."""
    x = embedding[tokens].to(torch.float32)
    return x * scale if scale != 1.0 else x


class InputStats:
    """Second moments of one linear input over the calibration tokens: the Gram trick's raw material.

    The output error of a linear with weight error ``E`` over tokens ``X`` is
    ``mean_t |E x_t|^2 = sum((E @ G) * E)`` with ``G = X^T X / n``, so the search scores every
    candidate without re-running the tokens.

    Args:
        channels: input width ``C``.
        device: where the sums live.
        gram: keep the Gram matrix; False keeps only the per-channel sums of squares (an importance
            matrix needs no more: ``C`` floats instead of ``C x C``, and no Gram products).

    Attributes:
        gram: ``sum_t x_t x_t^T`` ``(C, C)``, float32, summed in place (no ``C x C`` temporary:
            at 28672 inputs one copy is 3.3 GB).
        sq_sum: ``sum_t x_t^2`` per channel, float64, when no Gram is kept (else None).
        abs_sum: ``sum_t |x_t|`` per channel, float64.
        n: tokens seen.
    """

    # rows of the Gram updated per step by `divide` (bounds its temporary to ROWS x C)
    ROWS = 1024
    # `add` sums the Gram's upper block triangle only, in square blocks of this width (a Gram is
    # symmetric), mirrored once when read: 576 inputs cost 70% of the full product's FLOPs, 4096 53%;
    # narrower blocks lose more BLAS efficiency than they save (BENCHMARKS.md, "Gram block width")
    BLOCK = 256

    def __init__(self, channels: int, device: str | torch.device = "cpu", *, gram: bool = True) -> None:
        self._gram: torch.Tensor | None = (
            torch.zeros(channels, channels, dtype=torch.float32, device=device) if gram else None
        )
        self.sq_sum = None if gram else torch.zeros(channels, dtype=torch.float64, device=device)
        self._mirrored = True
        self.abs_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.n = 0

    @property
    def gram(self) -> torch.Tensor:
        if self.sq_sum is not None:
            raise LlmqError(
                "these input statistics hold no Gram matrix (captured for an importance matrix only)"
            )
        if not self._mirrored and self._gram is not None:  # the lower blocks from the upper ones
            for a, b in _blocks(self._gram.shape[0], self.BLOCK):
                self._gram[b:, a:b] = self._gram[a:b, b:].T
            self._mirrored = True
        return self._gram  # type: ignore[return-value]

    @gram.setter
    def gram(self, value: torch.Tensor | None) -> None:
        self._gram, self._mirrored = value, True

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if self.sq_sum is not None:
            self.sq_sum += (x2 * x2).sum(0).double()
        else:
            g = self._gram
            assert g is not None, "statistics already consumed"
            with torch.autocast(g.device.type, enabled=False):  # float32 sums inside a bfloat16 forward
                for a, b in _blocks(g.shape[0], self.BLOCK):  # row block a:b against itself and to its right
                    g[a:b, a:].addmm_(x2[:, a:b].T, x2[:, a:])
            self._mirrored = False
        self.abs_sum += x2.abs().sum(0).double()
        self.n += x2.shape[0]

    @property
    def mean_gram(self) -> torch.Tensor:
        """``G = X^T X / n`` in float32 (a new tensor on the CPU)."""
        return (self.gram / max(self.n, 1)).cpu()

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float().cpu()

    @property
    def mean_sq(self) -> np.ndarray:
        """Mean of x^2 per channel: llama.cpp's importance-matrix entry for this input."""
        if self.sq_sum is not None:
            return (self.sq_sum / max(self.n, 1)).float().cpu().numpy()
        return (torch.diagonal(self.gram) / max(self.n, 1)).cpu().numpy()

    def divide(self, s: torch.Tensor) -> None:
        """Statistics of ``x / s``: what the linear sees once ``s`` is folded into the op before it."""
        s = s.to(device=self.gram.device, dtype=torch.float32)
        for a in range(0, s.shape[0], self.ROWS):
            self.gram[a : a + self.ROWS] /= s[a : a + self.ROWS, None] * s[None, :]
        self.abs_sum /= s.double()


def _blocks(n: int, width: int) -> list[tuple[int, int]]:
    return [(a, min(a + width, n)) for a in range(0, n, width)]


# how capture_inputs makes a module's statistics: (channels, device) -> InputStats
StatsFactory = Callable[[int, "str | torch.device"], InputStats]


class _Captured(Exception):
    """Raised by the capture hook that records the last missing input of a forward whose output is
    not kept (`capture_inputs`)."""


def capture_inputs(
    layer: nn.Module,
    modules: list[str],
    store: ActivationStore,
    runner: LayerRunner,
    *,
    write_outputs: bool,
    new_stats: StatsFactory = InputStats,
    experts: Experts | None = None,
) -> dict[str, InputStats]:
    """Run every stored mini-batch through ``layer``, accumulating input statistics of ``modules``.

    Args:
        layer: a decoder layer.
        modules: names (relative to ``layer``) of linears whose inputs are recorded.
        store: the layer's input activations; overwritten with its outputs when ``write_outputs``.
        runner: runs the layer (mask, positions).
        write_outputs: replace each mini-batch by the layer's output (the next layer's input).
        new_stats: builds each module's `InputStats` from (channels, device).
        experts: the layer's MoE block, whose statistics per expert are recorded too (`llmq.moe`).

    Returns:
        module name -> its `InputStats`.
    """
    stats: dict[str, InputStats] = {}
    hooks = []
    if experts is not None:
        from .moe import capture_hooks

        stats, hooks = capture_hooks(layer, experts, runner.device, new_stats)
    # an output nobody keeps is not computed: the forward stops once every module has its input
    # (a dense layer skips its last linear's product, a quarter of its FLOPs)
    stop_early, pending = not write_outputs and experts is None, set()

    def record(name: str, x: torch.Tensor) -> None:
        stats[name].add(x)
        pending.discard(name)
        if stop_early and not pending:
            raise _Captured

    for name in modules:
        module = layer.get_submodule(name)
        stats[name] = new_stats(module.weight.shape[1], runner.device)
        hooks.append(module.register_forward_pre_hook(lambda _m, args, n=name: record(n, args[0])))
    try:
        for i in range(len(store)):
            pending.update(modules)
            try:
                y = runner(layer, store.read(i))
            except _Captured:
                continue
            if write_outputs:
                store.write(i, y)
    finally:
        for h in hooks:
            h.remove()
    return stats


class CalibrationFlow:
    """Calibration activations on their way through the model: embedded once, then layer by layer.

    Args:
        tokens: ``(n_samples, seqlen)`` token ids.
        embedding: the token embedding matrix.
        config: the model's transformers config.
        arch: its architecture spec.
        batch_size: windows per forward pass (bounds memory).
        device: where layers run.

    Example:
        >>> flow = CalibrationFlow(tokens, ckpt.get(arch.embed), ckpt.config, arch, batch_size=8)
        >>> stats = flow.capture(layer, ["mlp.down_proj"], write_outputs=True)  # layer's inputs -> outputs
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        embedding: torch.Tensor,
        config: Any,
        arch: ArchSpec,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        directory: str | None = None,
        forward_dtype: str = "float32",
    ) -> None:
        n, seqlen = tokens.shape
        self.store = ActivationStore(
            n, seqlen, embedding.shape[1], batch_size=batch_size, directory=directory
        )
        scale = arch.embed_multiplier(config)
        for i in range(len(self.store)):
            self.store.write(i, embed(tokens[i * batch_size : (i + 1) * batch_size], embedding, scale))
        self.runner = LayerRunner(config, arch, device, forward_dtype)
        self.arch = arch

    @classmethod
    def from_checkpoint(
        cls, calibration: Calibration, ckpt: Checkpoint, arch: ArchSpec, *, device: str | torch.device = "cpu"
    ) -> CalibrationFlow:
        """The flow of a calibration's windows (this process's share of them) through a checkpoint's layers."""
        from .distributed import shard

        return cls(
            shard(calibration.tokens),
            ckpt.get(arch.embed),
            ckpt.config,
            arch,
            batch_size=calibration.config.batch_size,
            device=device,
            forward_dtype=calibration.config.forward_dtype,
        )

    def capture(
        self,
        layer: nn.Module,
        modules: list[str],
        *,
        write_outputs: bool,
        new_stats: StatsFactory = InputStats,
    ) -> dict[str, InputStats]:
        """Input statistics of ``modules`` over all windows (and, if asked, step the windows through ``layer``)."""
        stats = capture_inputs(
            layer.to(self.runner.device),
            modules,
            self.store,
            self.runner,
            write_outputs=write_outputs,
            new_stats=new_stats,
            experts=self.arch.experts,
        )
        layer.to("cpu")  # the search and the codecs work on CPU tensors
        return stats

    def advance(self, layer: nn.Module) -> None:
        """Replace every window by ``layer``'s output on it."""
        layer = layer.to(self.runner.device)
        for i in range(len(self.store)):
            self.store.write(i, self.runner(layer, self.store.read(i)))
        layer.to("cpu")

    def close(self) -> None:
        self.store.close()
