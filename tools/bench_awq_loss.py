"""Cost of scoring one AWQ grid candidate: the output error over all calibration tokens, computed
directly (``|X E^T|^2`` over n tokens) and with the Gram trick (``sum((E G) * E)``, ``G = X^T X / n``).

Shapes are SmolLM2-135M's (hidden 576, MLP 1536) with AutoAWQ's default 128 x 512 tokens; the Gram
matrix is built once per linear input, then every candidate costs one ``(N, K) x (K, K)`` product.

Usage::

    python tools/bench_awq_loss.py [--tokens 65536] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from llmq.clip import output_error

SHAPES = {
    "q,k,v (960 x 576)": (960, 576),
    "gate,up (3072 x 576)": (3072, 576),
    "down (576 x 1536)": (576, 1536),
}


def best_of(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128 * 512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}, tokens: {args.tokens}\n")
    print(
        "| linear(s) | Gram build (once) s | direct s / candidate | Gram s / candidate | speed-up | rel. diff |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (n, k) in SHAPES.items():
        x = torch.randn(args.tokens, k, generator=gen)
        e = torch.randn(n, k, generator=gen) * 1e-2
        t_build = best_of(lambda x=x: x.T @ x, 1)
        gram = x.T @ x / args.tokens
        direct = lambda x=x, e=e: float(((x @ e.T) ** 2).sum() / x.shape[0])  # noqa: E731
        trick = lambda e=e, gram=gram: output_error(e, gram)  # noqa: E731
        t_direct, t_gram = best_of(direct, args.repeat), best_of(trick, args.repeat)
        diff = abs(direct() - trick()) / direct()
        print(
            f"| {name} | {t_build:.2f} | {t_direct:.3f} | {t_gram:.4f} | {t_direct / t_gram:.0f}x | {diff:.1e} |"
        )
        del x


if __name__ == "__main__":
    main()
