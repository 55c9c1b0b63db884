"""Build the *dithered* reference model: SmolLM2's linears moved off their Q4_1 grid.

The plain reference checkpoint (`tools/make_reference_model.py`) was dequantized from a Q4_1 file,
so every linear weight sits on a block-32 asymmetric 4-bit grid and round-to-nearest Q4_1 is nearly
lossless on it. Here each linear weight is moved uniformly at random (seeded) within its own Q4_1
cell — block of 32 along the row, ``d = (max - min) / 15``, ``w + U(-d/2, d/2)`` — which makes the
weights continuous again. Embeddings and norms are kept. The result is a noisier model; judge
quantizers on it by KL divergence against its own F16, not by perplexity.

Usage::

    python tools/make_dithered_reference.py PLAIN_DIR OUT_DIR [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LINEAR_SUFFIXES = ("_proj.weight",)


def dither(w: torch.Tensor, generator: torch.Generator, block: int = 32) -> torch.Tensor:
    """``w`` with every value moved uniformly within its block's Q4_1 cell (same dtype)."""
    x = w.float().reshape(-1, block)
    d = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 15
    noise = (torch.rand(x.shape, generator=generator) - 0.5) * d
    return (x + noise).reshape(w.shape).to(w.dtype)


def is_linear(name: str, t_shape: tuple[int, ...]) -> bool:
    return len(t_shape) == 2 and name.endswith(LINEAR_SUFFIXES)


def build_dithered(plain: Path, out: Path, *, seed: int = 0, force: bool = False) -> Path:
    """Write the dithered checkpoint to ``out`` (atomically: built beside it, renamed when complete)."""
    if (out / "model.safetensors").is_file() and not force:
        return out
    files = sorted(plain.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{plain}: no *.safetensors (build it with tools/make_reference_model.py)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for f in plain.iterdir():
            if f.suffix != ".safetensors" and f.is_file():
                shutil.copy2(f, tmp / f.name)
        gen = torch.Generator().manual_seed(seed)
        for f in files:
            tensors = {}
            with safe_open(f, "pt") as src:
                for name in sorted(src.keys()):  # sorted: the noise does not depend on file order
                    t = src.get_tensor(name)
                    tensors[name] = dither(t, gen) if is_linear(name, tuple(t.shape)) else t
            save_file(tensors, tmp / f.name, metadata={"format": "pt"})
        readme = tmp / "README.md"
        if readme.is_file():
            readme.write_text(
                readme.read_text()
                + f"\n\nDithered by llmq's tools/make_dithered_reference.py (seed {seed}): every linear weight "
                "moved uniformly within its Q4_1 cell (blocks of 32, d = (max - min) / 15).\n"
            )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plain", type=Path, help="the plain reference checkpoint directory")
    parser.add_argument("out", type=Path, help="directory to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT exists")
    args = parser.parse_args(argv)
    print(build_dithered(args.plain, args.out, seed=args.seed, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
