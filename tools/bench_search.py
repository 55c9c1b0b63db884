"""How cheaper scoring of AWQ scale candidates agrees with the full score: the choice, its regret, the time.

For each requested decoder layer of a model, the scale groups' candidate losses are computed by the
reference score (every output row, the storing encoder) and by each variant (``rows:N``: a fixed sample
of N rows per linear; ``fast``: `Target.scorer`, the storing encoder without K-quant refinement and, for group-wise
types, min/max fits; ``rtn``: round to nearest, unweighted; ``bf16``: the ``E @ G`` products in
bfloat16, `AWQConfig.score_dtype`; parts join with ``+``, e.g. ``fast+rows:1024+bf16``).
``--reference`` names the variant the others are judged against (default ``full``).
A variant agrees on a group when it picks the same candidate (unscaled included); its regret is the
reference loss of its pick over the reference loss of the reference pick, minus one. Layers see the FP
inputs of the layers before them (the K recipe's ``inputs="fp"``), so no choice changes another's data.

Usage::

    python tools/bench_search.py --model ~/.cache/llmq-tests/SmolLM2-135M-Instruct --quant Q4_K_M \\
        --layers 0,8,16,24 --variants rows:128,rows:256,rows:512,fast,fast+rows:256
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import llmq
from llmq.activations import CalibrationFlow
from llmq.awq import candidate_scales, scale_losses, skips_scaling
from llmq.calib import CalibConfig
from llmq.encoding import Target
from llmq.engine import calibrate, open_job
from llmq.stream import LayerStream

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLMQ_TEST_CACHE") or Path.home() / ".cache" / "llmq-tests")
CALIB = ROOT.parent / "shared" / "data" / "calibration" / "groups_merged.txt"


def parse_variant(v: str) -> tuple[int, bool, bool, str]:
    sample, exact, rtn, dtype = 0, True, False, "float32"
    for part in v.split("+"):
        if part == "bf16":
            dtype = "bfloat16"
        elif part == "fast":
            exact = False
        elif part == "rtn":
            exact, rtn = False, True
        elif part.startswith("rows:"):
            sample = int(part[5:])
        elif part != "full":
            raise SystemExit(f"variant {v!r}: parts are full, fast, rtn, bf16, rows:N")
    return sample, exact, rtn, dtype


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(CACHE / "SmolLM2-135M-Instruct"))
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument(
        "--group", type=int, default=0, help="group-wise 4-bit with this group (instead of --quant)"
    )
    ap.add_argument("--calib", default=str(CALIB))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", default="0,8,16,24")
    ap.add_argument("--variants", default="rows:128,rows:256,rows:512,fast,fast+rows:256")
    ap.add_argument("--reference", default="full", help="the variant the others are judged against")
    args = ap.parse_args()
    layers = sorted(int(x) for x in args.layers.split(","))
    variants = [args.reference, *args.variants.split(",")]
    quant = (
        llmq.QuantConfig(bits=4, group_size=args.group) if args.group else llmq.QuantConfig(quant=args.quant)
    )
    job = open_job(args.model, quant, progress=False)
    calibrate(job, CalibConfig(args.calib, n_samples=args.samples, seqlen=args.seqlen))
    flow = CalibrationFlow.from_checkpoint(job.calibration, job.ckpt, job.arch, device="cpu")
    stream = LayerStream(job.ckpt, job.arch)
    agree = {v: 0 for v in variants}
    regret: dict[str, list[float]] = {v: [] for v in variants}
    seconds = {v: 0.0 for v in variants}
    n_groups = 0
    for index in range(layers[-1] + 1):
        layer = stream.load(index)
        stats = flow.capture(layer, job.arch.capture_modules, write_outputs=True)
        if index in layers:
            plans = [p for p in job.plans if p.layer == index and p.role == "linear"]
            targets = {job.module_name(p): Target(p.codec, p.group, job.encoder) for p in plans}
            for group in job.arch.scale_groups:
                linears = [layer.get_submodule(n) for n in group.linears]
                prev = layer.get_submodule(group.prev)
                rows = group.prev_rows(layer) if group.prev_rows is not None else None
                if skips_scaling(group, prev, linears, rows):
                    continue
                st = stats[group.linears[0]]
                ws = [m.weight.data for m in linears]
                ts = [targets[n] for n in group.linears]
                cands = [None, *candidate_scales(ws, ts, st, job.awq)[1]]
                ref = None
                for v in variants:
                    sample, exact, rtn, dtype = parse_variant(v)
                    vts = [replace(t, encoder=replace(t.encoder, weighted=False)) for t in ts] if rtn else ts
                    t0 = time.perf_counter()
                    losses = scale_losses(ws, vts, st, cands, sample, exact, dtype)
                    seconds[v] += time.perf_counter() - t0
                    pick = min(range(len(losses)), key=lambda i: (losses[i], i))
                    if ref is None:
                        ref, ref_pick = losses, pick
                    agree[v] += pick == ref_pick
                    regret[v].append(ref[pick] / ref[ref_pick] - 1)
                n_groups += 1
                print(f"layer {index} {group.prev}: reference pick {ref_pick - 1} (alpha index; -1 unscaled)")
        del layer, stats
        job.ckpt.release()
    flow.close()
    print(
        f"\n{args.model} {f'g{args.group}' if args.group else args.quant}, layers {args.layers}, {n_groups} scale groups"
    )
    print(
        f"{'variant':<18} {'agree':>7} {'mean regret':>12} {'max regret':>11} {'seconds':>8} {'speed-up':>8}"
    )
    for v in variants:
        r = regret[v]
        print(
            f"{v:<18} {agree[v] / n_groups:>7.0%} {sum(r) / len(r):>12.2e} {max(r):>11.2e} "
            f"{seconds[v]:>8.1f} {seconds[args.reference] / seconds[v]:>7.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
