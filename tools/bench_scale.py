"""Conversion at real model sizes: the acceptance ratios of the scale issue, measured in one run.

Rows (``--rows``, comma-separated; each conversion is a fresh child process, time and peak RSS from
``wait4``; llama.cpp's tools run on the same ``--threads``):

- ``rtn8b``:  RTN ``--quant Q4_K_M`` of the 8B-shaped checkpoint (2 Llama-3.1-8B layers + embeddings,
  `tools/make_synthetic_model.py --preset 8b`) against ``llama-quantize`` of its F16 GGUF: the ratio
  of wall times (target <= 1.0).
- ``awq8b``:  AWQ ``--quant Q4_K_M`` of the same checkpoint, ``--samples`` x ``--seqlen`` calibration
  tokens of ``--calib``: seconds per decoder layer (the run's own per-layer timing) and the full 32-layer
  8B extrapolated from it (target: <= 120 s per layer on 2 CPU cores, <= 5 s on an H100/H200).
- ``smollm2``: AWQ (the default recipe) of SmolLM2 against llama.cpp's route on as many tokens of the
  same text (``llama-imatrix -c SEQLEN --chunks SAMPLES --no-ppl`` on its F16 GGUF, then
  ``llama-quantize --imatrix``): the ratio of wall times (target <= 1.5). The same route with llmq's
  importance matrix of llmq's windows is printed beside it.
- ``awq70b``: AWQ Q4_K_M of one Llama-3.1-70B-shaped layer (`--preset 70b`): peak RSS (target <= 16 GB)
  and, with ``--device cuda``, peak GPU memory.
- ``quick``: the README's first command, ``llmq convert SmolLM2 --quant Q4_K_M`` with every default
  (calibration included), through the CLI (target <= 120 s on 2 CPU cores).

Usage::

    python tools/bench_scale.py --rows rtn8b,smollm2 [--device cuda] [--samples 128] [--work /tmp/bs]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_llama_perplexity import build_llama_perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLMQ_TEST_CACHE") or Path.home() / ".cache" / "llmq-tests")
SMOLLM2 = CACHE / "SmolLM2-135M-Instruct"
CALIB = ROOT.parent / "shared" / "data" / "calibration" / "groups_merged.txt"
_LAYERS = re.compile(r"(\d+) layers, ([0-9.]+) s per layer")
# A conversion in a child: prints the run's timing line and, on a GPU, its peak memory.
CONVERT = """
import sys, json, torch, llmq
src, out, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
calib = llmq.CalibConfig(spec["calib"], n_samples=spec["samples"], seqlen=spec["seqlen"]) if spec["calib"] else None
res = llmq.convert(src, out, llmq.QuantConfig(**spec["quant"]), calib=calib, device=spec["device"],
                   overwrite=True, progress=False, write_card=False, write_report=False)
print(res.timing)
if torch.cuda.is_available() and spec["device"].startswith("cuda"):
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
"""
IMATRIX = """
import sys, subprocess
from llmq.calib import CalibConfig
from llmq.imatrix import compute_imatrix
from llmq.imatrix_io import write_imatrix
quantize, model, f16, out, calib, n, seqlen, threads = sys.argv[1:9]
imat = compute_imatrix(model, CalibConfig(calib, n_samples=int(n), seqlen=int(seqlen)), progress=False)
path = write_imatrix(out + ".imatrix.gguf", imat, n_tokens=int(n) * int(seqlen), datasets=[calib])
subprocess.run([quantize, "--imatrix", str(path), f16, out, "Q4_K_M", threads], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
"""


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS GiB, output) of ``cmd``; fails loudly with its output's tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out = proc.stdout.read().decode("utf-8", "replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:4])} ...\n{out[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20, out


def convert(
    src: Path, out: Path, quant: dict, args: argparse.Namespace, *, calib: bool
) -> tuple[float, float, str]:
    spec = {
        "quant": quant,
        "calib": str(args.calib) if calib else None,
        "samples": args.samples,
        "seqlen": args.seqlen,
        "device": args.device,
    }
    return run_child([sys.executable, "-c", CONVERT, str(src), str(out), json.dumps(spec)])


def synthetic(preset: str, work: Path) -> Path:
    path = work / f"synthetic-{preset}"
    if not (path / "config.json").is_file():
        tool = ROOT / "tools" / "make_synthetic_model.py"
        subprocess.run([sys.executable, str(tool), str(path), "--preset", preset], check=True)
    return path


def per_layer(out: str) -> float:
    m = _LAYERS.search(out)
    if not m:
        raise SystemExit(f"no timing line in:\n{out[-2000:]}")
    return float(m.group(2))


def phases(out: str) -> str:
    """The run's time per phase (calibrate, search, encode, write), from its timing line."""
    m = re.search(r"s\); (.*)$", out, re.M)
    return m.group(1) if m else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="quick,rtn8b,smollm2,awq8b,awq70b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmq-bench-scale"))
    ap.add_argument("--calib", type=Path, default=CALIB)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch_threads = {"OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(torch_threads)
    lines = [f"threads {args.threads}, device {args.device}, calibration {args.samples} x {args.seqlen}"]
    rows = args.rows.split(",")
    quantize = None
    if "rtn8b" in rows or "smollm2" in rows:
        quantize = build_llama_perplexity(log=lambda s: print(s, file=sys.stderr)).with_name("llama-quantize")
    if "quick" in rows:
        out = args.work / "quick.gguf"
        cli = [sys.executable, "-m", "llmq", "convert", str(SMOLLM2), "--quant", "Q4_K_M"]
        secs, rss, _ = run_child(cli + ["-o", str(out), "--force", "-q"])
        lines.append(f"quick: README's first convert {secs:.1f} s ({rss:.2f} GiB) (target <= 120 s)")
    if "rtn8b" in rows:
        src = synthetic("8b", args.work)
        f16 = args.work / "8b-F16.gguf"
        if not f16.is_file():
            convert(src, f16, {"quant": "F16"}, args, calib=False)
        secs, rss, _ = convert(
            src, args.work / "8b-rtn.gguf", {"quant": "Q4_K_M", "method": "rtn"}, args, calib=False
        )
        ref, ref_rss, _ = run_child(
            [str(quantize), str(f16), str(args.work / "8b-lq.gguf"), "Q4_K_M", str(args.threads)]
        )
        lines.append(
            f"rtn8b: llmq {secs:.1f} s ({rss:.2f} GiB), llama-quantize {ref:.1f} s ({ref_rss:.2f} GiB): "
            f"ratio {secs / ref:.2f} (target <= 1.0)"
        )
    if "smollm2" in rows:
        f16 = args.work / "smollm2-F16.gguf"
        if not f16.is_file():
            convert(SMOLLM2, f16, {"quant": "F16"}, args, calib=False)
        secs, rss, _ = convert(SMOLLM2, args.work / "smollm2-awq.gguf", {"quant": "Q4_K_M"}, args, calib=True)
        cmd = [
            sys.executable,
            "-c",
            IMATRIX,
            str(quantize),
            str(SMOLLM2),
            str(f16),
            str(args.work / "smollm2-im.gguf"),
        ]
        ours, _, _ = run_child(
            cmd + [str(args.calib), str(args.samples), str(args.seqlen), str(args.threads)]
        )
        imat = args.work / "smollm2-llama.imatrix.gguf"
        im, im_rss, _ = run_child(
            [str(quantize.with_name("llama-imatrix")), "-m", str(f16), "-f", str(args.calib), "-o", str(imat)]
            + ["-c", str(args.seqlen), "--chunks", str(args.samples), "-t", str(args.threads), "--no-ppl"]
        )
        q, _, _ = run_child(
            [str(quantize), "--imatrix", str(imat), str(f16), str(args.work / "smollm2-lq.gguf"), "Q4_K_M"]
            + [str(args.threads)]
        )
        lines.append(
            f"smollm2: llmq AWQ {secs:.1f} s ({rss:.2f} GiB), llama-imatrix + llama-quantize "
            f"{im:.1f} + {q:.1f} s ({im_rss:.2f} GiB): ratio {secs / (im + q):.2f} (target <= 1.5); "
            f"with llmq's importance matrix instead {ours:.1f} s: ratio {secs / ours:.2f}"
        )

    def awq(preset: str) -> tuple[float, float, str]:
        src = synthetic(preset, args.work)
        return convert(src, args.work / f"{preset}-awq.gguf", {"quant": "Q4_K_M"}, args, calib=True)

    if "awq8b" in rows:
        secs, rss, out = awq("8b")
        layer = per_layer(out)
        lines.append(
            f"awq8b: {layer:.1f} s per layer, {secs:.1f} s for 2 layers + embeddings ({rss:.2f} GiB); "
            f"32 layers ~ {32 * layer / 60:.1f} min (target <= 120 s per layer on CPU, <= 5 s on a GPU)"
        )
        lines.append(f"  phases: {phases(out)}")
    if "awq70b" in rows:
        secs, rss, out = awq("70b")
        gpu = re.search(r"peak GPU memory ([0-9.]+) GiB", out)
        lines.append(
            f"awq70b: one layer {per_layer(out):.1f} s, peak RSS {rss:.2f} GiB (target <= 16)"
            + (f", peak GPU memory {gpu.group(1)} GiB" if gpu else "")
        )
        lines.append(f"  phases: {phases(out)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
