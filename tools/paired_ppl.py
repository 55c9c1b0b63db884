"""Paired perplexity difference of two quantized models on the same text, with its uncertainty.

llama-perplexity's ``±`` on each PPL is the spread of one model's token losses (±0.43 on SmolLM2's
WikiText-2 PPL of 22.5); two quants of one model err on the same hard tokens, so the uncertainty of
their *difference* is far smaller. This reads two ``--kl-divergence`` logs (``<row>.ppl.log`` files
that ``tools/bench_quality.py`` keeps), recovers each chunk's mean token loss from the running PPL
column (chunk i's = i·ln PPL_i − (i−1)·ln PPL_(i−1); the column's 4 decimals bound the rounding to
~5e-4 per chunk) and prints the mean per-chunk difference ± its standard error over chunks.

Example:
    python tools/paired_ppl.py /tmp/bq6/plain-awq@64-Q5_K_M.ppl.log /tmp/bq6/plain-imatrix@64-Q5_K_M.ppl.log
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

# a per-chunk line of `llama-perplexity --kl-divergence`: index, running PPL ± its uncertainty, ...
_CHUNK = re.compile(r"^\s*(\d+)\s+([0-9.]+)\s+±\s+[0-9.]+\s+-?[0-9.]+\s+±")


def chunk_losses(log: Path) -> list[float]:
    """Each chunk's mean token loss (nats), from the running PPL column of ``log``."""
    running: dict[int, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = _CHUNK.match(line)
        if m:
            running[int(m.group(1))] = math.log(float(m.group(2)))
    if not running or sorted(running) != list(range(1, len(running) + 1)):
        raise SystemExit(f"{log}: no complete per-chunk table of llama-perplexity --kl-divergence")
    n = len(running)
    return [i * running[i] - (i - 1) * running.get(i - 1, 0.0) for i in range(1, n + 1)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="log of model A")
    ap.add_argument("b", type=Path, help="log of model B (same text, same chunks)")
    args = ap.parse_args(argv)
    la, lb = chunk_losses(args.a), chunk_losses(args.b)
    if len(la) != len(lb):
        raise SystemExit(f"chunk counts differ: {len(la)} in {args.a}, {len(lb)} in {args.b}")
    d = [x - y for x, y in zip(la, lb, strict=True)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    wins = sum(x < 0 for x in d)
    print(f"chunks: {n}; A lower in {wins}, B lower in {n - wins - sum(x == 0 for x in d)}")
    print(f"ln PPL(A) - ln PPL(B) = {mean:+.5f} ± {se:.5f} (paired SE over chunks)")
    print(
        f"PPL(A) / PPL(B) = {math.exp(mean):.5f}  (95% interval {math.exp(mean - 2 * se):.5f} … "
        f"{math.exp(mean + 2 * se):.5f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
