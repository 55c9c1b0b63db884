"""Throughput of llmq's NumPy reference kernels, per format, against numpy on a pre-decoded matrix.

For an N x K weight (default 4096 x 4096, standard normal, quantized by gguf-py, llmq's K-quant codecs or ``pack_awq``):
decode throughput of ``dequantize``, GFLOP/s of the tiled ``matmul`` at batch 1 and 64, the ratio to
``x @ W_f32.T`` on the pre-decoded float32 matrix (same process, same x, timed interleaved), and
the peak extra memory of the tiled path (tracemalloc, output included). Prints a Markdown table.

Usage:
    python tools/bench_kernels.py [--repeat 5] [--tile-rows 256] [--size 4096] [--formats Q4_0 Q8_0]
        [--blas-threads N]
``--blas-threads`` sets OPENBLAS_NUM_THREADS/OMP_NUM_THREADS before numpy loads; by default the
environment is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
import tracemalloc
from collections.abc import Callable
from typing import Any


def _blas_summary() -> str:
    import numpy as np

    try:
        from threadpoolctl import threadpool_info

        pools = [
            f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')}, {p.get('num_threads')} threads)"
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        ]
        return "; ".join(pools) or "no BLAS pool found by threadpoolctl"
    except ImportError:
        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        config = " ".join(str(blas.get("openblas configuration", "")).split())
        return f"{blas.get('name')} {blas.get('version')} [{config}] (np.show_config; threadpoolctl not installed)"


def _header(args: argparse.Namespace) -> str:
    import numpy as np

    env = {k: v for k, v in sorted(os.environ.items()) if any(t in k for t in ("BLAS", "OMP_", "MKL_"))}
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join(
        [
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {load} (1/5/15 min) at start",
            f"- python {platform.python_version()}, numpy {np.__version__}, BLAS: {_blas_summary()}",
            f"- BLAS environment: {env or 'none set'}",
            f"- weight {args.size}x{args.size}, tile_rows {args.tile_rows}, best of {args.repeat}",
        ]
    )


def _nbytes(packed: Any) -> int:
    if dataclasses.is_dataclass(packed):
        return sum(
            getattr(packed, f.name).nbytes for f in dataclasses.fields(packed) if f.name != "group_size"
        )
    return int(packed.nbytes)


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_pair(a: Callable[[], object], b: Callable[[], object], repeat: int) -> tuple[float, float]:
    # Interleaved so that load changes on a shared machine hit both sides alike.
    ta = tb = float("inf")
    for _ in range(repeat):
        ta = min(ta, _best(a, 1))
        tb = min(tb, _best(b, 1))
    return ta, tb


def _pack(name: str, w: Any) -> Any:
    import numpy as np
    from gguf import GGMLQuantizationType, quants
    from llmq.kernels import FORMATS, GGUFBlockFormat, pack_awq

    if isinstance(FORMATS[name], GGUFBlockFormat):
        try:
            data = quants.quantize(w, GGMLQuantizationType[name])
        except NotImplementedError:  # gguf-py has no K-quant encoder: llmq's (byte-identical to libggml)
            from llmq.codecs import get_codec

            data = get_codec(name).encode(w)
        return np.ascontiguousarray(data).view(np.uint8)
    if name == "AWQ_INT4":
        return pack_awq(w, group_size=128)
    raise SystemExit(f"bench_kernels: no packer for format {name}")


def bench_format(name: str, args: argparse.Namespace) -> str:
    """Benchmark one format; return its Markdown table row."""
    import numpy as np
    from llmq.kernels import dequantize, matmul

    n = k = args.size
    rng = np.random.default_rng(0)
    packed = _pack(name, rng.standard_normal((n, k), dtype=np.float32))
    t_dec = _best(lambda: dequantize(packed, name, (n, k)), args.repeat)
    w32 = dequantize(packed, name, (n, k))
    cells = [name, f"{_nbytes(packed) * 8 / (n * k):.2f}", f"{n * k / t_dec / 1e6:,.0f}"]
    for batch in (1, 64):
        x = rng.standard_normal((batch, k), dtype=np.float32)
        t_ref, t_tiled = _best_pair(
            lambda x=x: x @ w32.T,
            lambda x=x: matmul(x, packed, name, (n, k), tile_rows=args.tile_rows),
            args.repeat,
        )
        flop = 2.0 * batch * n * k
        cells += [f"{flop / t_tiled / 1e9:.1f}", f"{flop / t_ref / 1e9:.1f}", f"{t_ref / t_tiled:.2f}x"]
    x = rng.standard_normal((64, k), dtype=np.float32)
    tracemalloc.start()
    matmul(x, packed, name, (n, k), tile_rows=args.tile_rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    cells.append(f"{peak / 2**20:.1f} ({peak / (n * k * 4):.1%})")
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (best is kept)")
    parser.add_argument("--tile-rows", type=int, default=256, help="output rows decoded per matmul step")
    parser.add_argument("--size", type=int, default=4096, help="N = K of the weight")
    parser.add_argument("--formats", nargs="+", help="formats to run (default: all registered)")
    parser.add_argument("--blas-threads", type=int, help="set OPENBLAS_NUM_THREADS/OMP_NUM_THREADS first")
    args = parser.parse_args(argv)
    if args.blas_threads is not None:  # must precede the first numpy import
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.blas_threads)

    from llmq.kernels import FORMATS

    names = [n.upper() for n in args.formats] if args.formats else list(FORMATS)
    print(_header(args), end="\n\n", flush=True)
    print(
        "| format | bits/w | decode Mweights/s | b=1 tiled GFLOP/s | b=1 f32 GFLOP/s | b=1 tiled/f32 "
        "| b=64 tiled GFLOP/s | b=64 f32 GFLOP/s | b=64 tiled/f32 | peak extra MiB, b=64 (of f32 W) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for name in names:
        print(bench_format(name, args), flush=True)
    print(f"\nload average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
