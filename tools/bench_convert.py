"""Peak memory and time of `llmq convert` on the reference model, against baselines in the same script.

Each run is a fresh child process; its peak RSS comes from the kernel (``wait4`` rusage). Baselines:
``import floor`` (python + torch + transformers + llmq imported, nothing loaded) and ``whole-model
load`` (transformers' ``from_pretrained`` of the full bf16 checkpoint, what a non-streaming converter
starts from).

``--formats G`` compares the output formats on one search: ``--bits 4 --group G`` written as GGUF,
as each safetensors checkpoint and as GGUF + compressed-tensors from one run.

Usage:
    python tools/bench_convert.py [MODEL_DIR] [--quant Q4_0 --quant Q8_0 ...] [--formats 64]
MODEL_DIR defaults to the reference model built by tools/make_reference_model.py in ~/.cache/llmq-tests;
``tools/make_synthetic_model.py OUT --preset 1b`` builds a sharded ~1B checkpoint for it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORTS = "import torch, transformers, transformers.models.llama.modeling_llama, llmq"
SNIPPETS = {
    "import floor": IMPORTS,
    "whole-model load (transformers, bf16)": IMPORTS + "\n"
    "m = transformers.AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.bfloat16)\n"
    # touch every weight, as converting it must (safetensors maps pages in lazily)
    "total = sum(float(p.float().abs().sum()) for p in m.parameters())",
}
CONVERT = (
    IMPORTS
    + "\nllmq.convert({model!r}, {out!r}, llmq.QuantConfig(method='rtn', {args}), formats={formats!r},"
    " progress=False, overwrite=True)"
)


def run_child(code: str) -> tuple[float, float]:
    """Run ``code`` in a fresh interpreter; return (peak RSS MiB, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{code}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def bf16_size(model: Path) -> float:
    return sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20


def main() -> None:
    default = (
        Path(os.environ.get("LLMQ_TEST_CACHE") or Path.home() / ".cache" / "llmq-tests")
        / "SmolLM2-135M-Instruct"
    )
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path, default=default)
    ap.add_argument("--quant", action="append", help="GGUF type(s) to convert to (default: Q4_0 Q8_0)")
    ap.add_argument("--group128", action="store_true", help="also run --bits 4 --group 128")
    ap.add_argument("--formats", type=int, metavar="G", help="compare output formats at --bits 4 --group G")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(
            f"{args.model}: no model; build it with: python tools/make_reference_model.py {args.model}"
        )
    model = str(args.model)
    rows: list[tuple[str, float, float]] = []
    for name, code in SNIPPETS.items():
        rows.append((name, *run_child(code.format(model=model))))
    with tempfile.TemporaryDirectory() as tmp:
        configs = [
            (f"llmq convert --quant {q}", f"quant={q!r}", "gguf") for q in (args.quant or ["Q4_0", "Q8_0"])
        ]
        if args.group128:
            configs.append(("llmq convert --bits 4 --group 128", "bits=4, group_size=128", "gguf"))
        if args.formats:
            for fmt in ("gguf", "compressed-tensors", "awq", "gguf,compressed-tensors"):
                label = f"llmq convert --bits 4 --group {args.formats} --format {fmt}"
                configs.append((label, f"bits=4, group_size={args.formats}", fmt))
        for label, cfg, fmt in configs:
            out = str(Path(tmp) / ("out.gguf" if fmt.startswith("gguf") else "out"))
            code = CONVERT.format(model=model, out=out, args=cfg, formats=fmt)
            rows.append((label, *run_child(code)))
    floor = rows[0][1]
    whole = rows[1][1] - floor
    print(f"model: {args.model}  (bf16 safetensors: {bf16_size(args.model):.1f} MiB)\n")
    print("| run | peak RSS (MiB) | above import floor (MiB) | vs whole-model load | time (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, rss, secs in rows:
        above = rss - floor
        ratio = f"{above / whole:.2f}x" if rows.index((label, rss, secs)) > 0 else "-"
        print(f"| {label} | {rss:.0f} | {above:.0f} | {ratio} | {secs:.1f} |")


if __name__ == "__main__":
    main()
