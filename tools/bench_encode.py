"""Encoding throughput of the K-quant codecs on each backend: NumPy, torch on the CPU, torch on CUDA,
and libggml's ``ggml_quantize_chunk`` where llama-cpp-python is installed.

For an N x K weight (default 1024 x 4096, standard normal) and a lognormal importance vector, times
``codec.encode`` per format, round-to-nearest (llama.cpp's ``quantize_row_q*_K_ref``) and
importance-weighted (``quantize_row_q*_K_impl``), on each backend present, and checks that every
backend wrote the same bytes. Prints a Markdown table: weights/s and the ratio to NumPy.

Usage:
    python tools/bench_encode.py [--rows 1024] [--cols 4096] [--repeat 3] [--formats Q4_K Q6_K]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from llmq.codecs import REGISTRY, ggml


def _best(fn: Callable[[], object], repeat: int, sync: Callable[[], None]) -> tuple[float, object]:
    out, best = None, float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096, help="a multiple of 256")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best is kept)")
    ap.add_argument("--formats", nargs="+", default=sorted(n for n, c in REGISTRY.items() if c.array_api))
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    imp = np.exp(rng.standard_normal(args.cols) * 1.5).astype(np.float32)

    def encode(c, x, i):  # noqa: ANN001, ANN202
        return c.encode(x, i)

    def libggml(c, x, i):  # noqa: ANN001, ANN202  (one call, one thread, as the NumPy row)
        return ggml.encode(int(c.qtype), x, c.nbytes(x.shape), i if c.supports_importance else None)

    Backend = tuple[Callable[[np.ndarray], object], Callable[[], None], Callable[..., object]]
    backends: dict[str, Backend] = {
        "numpy": (lambda a: a, lambda: None, encode),
        "torch cpu": (torch.from_numpy, lambda: None, encode),
    }
    if torch.cuda.is_available():
        backends["torch cuda"] = (lambda a: torch.from_numpy(a).cuda(), torch.cuda.synchronize, encode)
    if ggml.quantize_chunk() is not None:
        backends["libggml"] = (lambda a: a, lambda: None, libggml)

    print(
        f"- {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}; weight {args.rows}x{args.cols}, "
        f"best of {args.repeat}\n"
    )
    names = list(backends)
    print(
        "| format | mode | "
        + " | ".join(f"{b} Mweights/s" for b in names)
        + " | "
        + " | ".join(f"{b} / numpy" for b in names[1:])
        + " | same bytes |"
    )
    print(
        "| --- | --- | "
        + " | ".join("---:" for _ in names)
        + " | "
        + " | ".join("---:" for _ in names[1:])
        + " | --- |"
    )
    for name in args.formats:
        codec = REGISTRY[name]
        for mode, importance in (("rtn", None), ("imatrix", imp)):
            secs, outs = {}, {}
            for b, (to, sync, fn) in backends.items():
                x, i = to(w), None if importance is None else to(importance)
                secs[b], out = _best(lambda x=x, i=i, c=codec, fn=fn: fn(c, x, i), args.repeat, sync)
                outs[b] = out if isinstance(out, np.ndarray) else out.cpu().numpy()
            ref = outs["numpy"].reshape(-1)
            same = all(np.array_equal(ref, o.reshape(-1)) for o in outs.values())
            rate = {b: w.size / s / 1e6 for b, s in secs.items()}
            print(
                f"| {name} | {mode} | "
                + " | ".join(f"{rate[b]:.2f}" for b in names)
                + " | "
                + " | ".join(f"{secs['numpy'] / secs[b]:.2f}x" for b in names[1:])
                + f" | {'yes' if same else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
