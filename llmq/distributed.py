"""Calibration split across processes with `torch.distributed` (``torchrun``): gloo on CPUs, nccl on GPUs.

Each process runs its share of the calibration windows through every layer; the input statistics are
summed over all processes (all-reduce) before the search, so every process searches the same
statistics and reaches the same scales — the single-process result within floating-point tolerance
(sums in another order). Layers stay in order; each process encodes its share of a layer's linears
and broadcasts their bytes to the others (`owners`, `share`); process 0 alone writes the outputs.

Example::

    torchrun --nproc-per-node 2 -m llmq convert MODEL --quant Q4_K_M
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import LlmqError


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> str:
    """Join the process group ``torchrun`` describes in the environment (once); return this process's device.

    Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing happens and ``device`` is returned.
    A CUDA device becomes ``cuda:LOCAL_RANK``, one GPU per process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def shard(tokens: torch.Tensor) -> torch.Tensor:
    """This process's calibration windows: every ``world size``-th one from its rank."""
    rank, size = world()
    if size > 1 and len(tokens) < size:
        raise LlmqError(f"{len(tokens)} calibration windows cannot be split across {size} processes")
    return tokens[rank::size] if size > 1 else tokens


def all_reduce_stats(stats: dict[str, Any]) -> None:
    """Sum every process's `InputStats` in place (no-op in a single process)."""
    if world()[1] <= 1:
        return
    for name in sorted(stats):  # the same order in every process
        st = stats[name]
        dist.all_reduce(st.sq_sum if st.sq_sum is not None else st.gram)
        dist.all_reduce(st.abs_sum)
        n = torch.tensor([st.n], dtype=torch.int64, device=st.abs_sum.device)
        dist.all_reduce(n)
        st.n = int(n.item())


def owners(sizes: dict[str, int]) -> dict[str, int]:
    """Which process encodes each tensor (by name): the largest first, each to the least loaded process.

    The same assignment in every process (it depends only on ``sizes``); one process owns all.
    """
    size = world()[1]
    load = [0] * size
    out = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(size), key=lambda r: (load[r], r))
        out[name] = rank
        load[rank] += sizes[name]
    return out


_CPU_GROUP: Any = None


def _cpu_group() -> Any:
    """A gloo group for CPU tensors (the default group may be nccl's), made once by every process."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _CPU_GROUP


def share(
    arrays: dict[str, np.ndarray | None], owner: dict[str, int], shapes: dict[str, tuple[int, ...]]
) -> None:
    """Fill every process's ``arrays`` (uint8, by name) with its owner's bytes, in place: a broadcast each."""
    if world()[1] <= 1:
        return
    rank = world()[0]
    for name in sorted(arrays):  # the same order in every process
        if owner[name] == rank:
            buf = torch.from_numpy(np.ascontiguousarray(arrays[name]))
        else:
            buf = torch.empty(shapes[name], dtype=torch.uint8)
        dist.broadcast(buf, src=owner[name], group=_cpu_group())
        arrays[name] = buf.numpy()
