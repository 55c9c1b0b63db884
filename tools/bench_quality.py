"""Quality, time and memory of llmq's RTN and AWQ files against llama.cpp's importance-matrix quants.

For each reference model (the plain SmolLM2 reference and its dithered twin, see
`tools/make_dithered_reference.py`) this script writes the F16 GGUF, has llama.cpp's own
``llama-perplexity`` save its logits (``--kl-divergence-base``), then for every row converts the model
in a fresh child process (time and peak RSS from ``wait4``) and runs ``llama-perplexity
--kl-divergence`` on the result: perplexity on WikiText-2 test and KL divergence against the F16 file.

Rows (``--rows``, comma-separated ``METHOD:QUANT``):
  METHOD: ``rtn``; ``awq`` (what ``llmq convert`` does with no flags: the recipe `llmq.recipes` picks
  for the type family, calibrated on ``--calib``); ``awq-self`` (the same with ``--calib self``);
  recipes spelled out as Python config fields (`AWQConfig`, `EncoderConfig`), whatever the default:
  ``awq-legacy`` (scales + clip + weighted encoding, next inputs from the quantized layer: the legacy
  and group-wise default), ``awq-kmix`` (next inputs from the FP layer, no clip, error feedback, and
  K-quant refinement where the type has it: the K default), and ablations of the legacy recipe
  ``awq-noscale``, ``awq-noclip``, ``awq-noweight``, ``awq-act``, ``awq-fpin``, ``awq-fb`` (with
  error feedback), ``awq-fpin-noclip``; and
  ``imatrix``: llama.cpp's ``llama-quantize --imatrix FILE`` of the F16 file, FILE an importance
  matrix (mean x^2 per input column, llama.cpp's GGUF imatrix format) that llmq
  computes from the same calibration windows.
  ``METHOD@N`` calibrates on N windows instead of ``--samples`` (``awq@32:Q4_0``).
  QUANT: ``Q4_0``, ``Q4_1``, ``g128`` (``--bits 4 --group 128``), ``g128s`` (the same, ``--sym``),
  and llama.cpp's K mixes (``Q4_K_M``, ``Q3_K_M`` ...: the same per-tensor types as llama-quantize).
3-bit group-wise rows are not offered: no GGUF type stores 3-bit groups exactly; Q3_K_M is the 3-bit row.

Results are cached per file in ``--work`` (delete a row's JSON to redo it), so a long table can be
built in several runs. Usage::

    python tools/bench_quality.py --model PLAIN_DIR --dithered DITHERED_DIR \\
        --calib ../shared/data/calibration/groups_merged.txt \\
        --text ../shared/data/wikitext-2-raw/wiki.test.raw --chunks 100 --work /tmp/bq \\
        --rows rtn:Q4_0,awq:Q4_0,imatrix:Q4_0
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

QUANTS = {
    "Q4_0": {"quant": "Q4_0"},
    "Q4_1": {"quant": "Q4_1"},
    "g128": {"bits": 4, "group_size": 128},
    "g128s": {"bits": 4, "group_size": 128, "sym": True},
    **{
        m: {"quant": m}
        for m in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
    },
}
# file types llama.cpp's own quantizer can build for an imatrix row
LLAMA_FTYPES = (
    "Q4_0",
    "Q4_1",
    "Q2_K",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
)
# METHOD -> (AWQConfig fields, EncoderConfig fields); None = the library's default for the family
LEGACY = {"inputs": "quant", "clip": True}
METHODS: dict[str, tuple[dict, dict] | None] = {
    "awq": None,
    "awq-self": None,
    "awq-builtin": None,
    "awq-legacy": (LEGACY, {}),
    "awq-kmix": ({"inputs": "fp", "clip": False}, {"feedback": True, "refine": "auto"}),
    # the K recipe scoring scale candidates on every row with the storing encoder (before sampled scoring)
    "awq-kexact": (
        {"inputs": "fp", "clip": False, "sample_rows": 0, "exact_scoring": True},
        {"feedback": True, "refine": "auto"},
    ),
    "awq-noscale": ({**LEGACY, "scale": False}, {}),
    "awq-noclip": ({**LEGACY, "clip": False}, {}),
    "awq-noweight": (LEGACY, {"weighted": False}),
    "awq-act": ({**LEGACY, "duo_scaling": False}, {}),
    "awq-fpin": ({**LEGACY, "inputs": "fp"}, {}),
    "awq-fb": (LEGACY, {"feedback": True}),
    "awq-fpin-noclip": ({"inputs": "fp", "clip": False}, {}),
}
# one llmq conversion through the Python API (research knobs are config fields, not flags)
CONVERT_CHILD = """
import json, sys
import llmq
from llmq.awq import AWQConfig
from llmq.calib import CalibConfig
from llmq.encoding import EncoderConfig
from llmq.recipes import is_k_family
model, out, spec = sys.argv[1:4]
spec = json.loads(spec)
cfg = llmq.QuantConfig(method=spec["method"], **spec["quant"])
kw = {}
if spec["method"] == "awq":
    kw["calib"] = CalibConfig(spec["calib"], n_samples=spec["samples"], seqlen=spec["seqlen"])
    if spec["recipe"] is not None:
        awq, enc = spec["recipe"]
        if enc.get("refine") == "auto":
            enc["refine"] = is_k_family(cfg)
        kw["awq"], kw["encoder"] = AWQConfig(**awq), EncoderConfig(**enc)
llmq.convert(model, out, cfg, overwrite=True, progress=False, write_card=False, write_report=False, **kw)
"""
# llama.cpp's route, as its users run it: an importance matrix file (llmq computes it from the same
# calibration windows; `llama-imatrix` would write the same format), then `llama-quantize --imatrix`,
# which also records its quantize.imatrix.* provenance keys in the file.
IMATRIX_CHILD = """
import subprocess, sys
from llmq.calib import CalibConfig
from llmq.imatrix import compute_imatrix
from llmq.imatrix_io import write_imatrix
quantize, model, f16, out, ftype, calib, n, seqlen = sys.argv[1:9]
n, seqlen = int(n), int(seqlen)
imat = compute_imatrix(model, CalibConfig(calib, n_samples=n, seqlen=seqlen), progress=False)
path = write_imatrix(out + ".imatrix.gguf", imat, n_tokens=n * seqlen, datasets=[calib], chunk_count=n,
                     chunk_size=seqlen)
subprocess.run([quantize, "--imatrix", str(path), f16, out, ftype, "2"], check=True, stdout=subprocess.DEVNULL)
path.unlink()
"""
_PPL = re.compile(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)\s*(?:±|\+/-)\s*([0-9.]+)")
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+)\s+\+/-\s+([0-9.]+)")
_KLD = re.compile(r"Mean\s+KLD:\s*([0-9.]+)\s*±\s*([0-9.]+)")
_KLD99 = re.compile(r"99\.0%\s+KLD:\s*([0-9.]+)")
_TOP1 = re.compile(r"Same top p:\s*([0-9.]+)\s*±\s*([0-9.]+)\s*%")


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``; return (peak RSS MiB, seconds, output). Fails loudly with the output tail."""
    t0 = time.perf_counter()
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(cmd, stdin=devnull, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out_bytes = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
    out = out_bytes.decode("utf-8", "replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, out


def perplexity(binary: Path, model: Path, args: argparse.Namespace, base: Path, *, save: bool) -> dict:
    """llama-perplexity on ``model``: saves the KL base (F16) or scores against it.

    Its output is kept as ``<row>.ppl.log`` beside the row's JSON: the per-chunk lines are what
    ``tools/paired_ppl.py`` compares two rows with."""
    cmd = [str(binary), "-m", str(model), "-f", str(args.text), "-c", "512", "--chunks", str(args.chunks)]
    # --no-repack: llama.cpp's repacked (AMX) CPU kernels crash on this machine (see llmq.eval._llama)
    cmd += ["-fa", "off", "--no-repack", "-t", str(args.threads), "--kl-divergence-base", str(base)]
    if not save:
        cmd.append("--kl-divergence")
    _, secs, out = run_child(cmd)
    model.with_suffix(".ppl.log").write_text(out)
    if save:
        m = _FINAL.search(out)
        assert m, out[-2000:]
        return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "eval_s": secs}
    ppl, kld, top1 = _PPL.search(out), _KLD.search(out), _TOP1.search(out)
    assert ppl and kld and top1, out[-3000:]
    p99 = _KLD99.search(out)
    return {
        "ppl": float(ppl.group(1)),
        "ppl_err": float(ppl.group(2)),
        "kl": float(kld.group(1)),
        "kl_err": float(kld.group(2)),
        "kl_p99": float(p99.group(1)) if p99 else None,
        "top1": float(top1.group(1)) / 100,
        "eval_s": secs,
    }


def row(
    ref: str, model: Path, spec: str, f16: Path, args: argparse.Namespace, binary: Path, base: Path
) -> dict:
    work: Path = args.work
    cache = work / f"{ref}-{spec.replace(':', '-')}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    method, quant = spec.split(":")
    method, _, n = method.partition("@")  # awq@32: 32 calibration windows instead of --samples
    if method not in METHODS and method not in ("rtn", "imatrix") or quant not in QUANTS:
        raise SystemExit(
            f"{spec}: methods {', '.join(['rtn', 'imatrix', *METHODS])}; quants {', '.join(QUANTS)}"
        )
    samples = int(n) if n else args.samples
    out = work / f"{ref}-{method}{'@' + n if n else ''}-{quant}.gguf"
    if method == "imatrix":
        if quant not in LLAMA_FTYPES:
            raise SystemExit(f"{spec}: imatrix rows are llama.cpp file types ({', '.join(LLAMA_FTYPES)})")
        quantize = binary.with_name("llama-quantize")  # built beside llama-perplexity
        child = [sys.executable, "-c", IMATRIX_CHILD, str(quantize), str(model), str(f16), str(out), quant]
        rss, secs, _ = run_child(child + [str(args.calib), str(samples), str(args.seqlen)])
    else:
        spec_json = {
            "method": "rtn" if method == "rtn" else "awq",
            "quant": QUANTS[quant],
            "recipe": None if method == "rtn" else METHODS[method],
            "calib": {"awq-self": "self", "awq-builtin": "builtin"}.get(method, str(args.calib)),
            "samples": samples,
            "seqlen": args.seqlen,
        }
        rss, secs, _ = run_child(
            [sys.executable, "-c", CONVERT_CHILD, str(model), str(out), json.dumps(spec_json)]
        )
    size = out.stat().st_size
    res = {
        "ref": ref,
        "row": spec,
        "file_mib": size / 2**20,
        "file_bytes": size,
        "convert_s": secs,
        "rss_mib": rss,
    }
    res.update(perplexity(binary, out, args, base, save=False))
    if not args.keep:
        out.unlink()
    cache.write_text(json.dumps(res, indent=1))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="plain reference checkpoint")
    ap.add_argument("--dithered", type=Path, help="dithered reference checkpoint")
    ap.add_argument("--calib", type=Path, required=True, help="calibration text (never the evaluation text)")
    ap.add_argument("--text", type=Path, required=True, help="evaluation text (WikiText-2 test)")
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, required=True, help="directory for files and cached results")
    ap.add_argument("--rows", default="rtn:Q4_0,awq:Q4_0,imatrix:Q4_0", help="comma-separated METHOD:QUANT")
    ap.add_argument("--refs", default="plain,dithered", help="which references: plain, dithered")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files")
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    binary = build_llama_perplexity(log=lambda s: print(s, file=sys.stderr))
    refs = {"plain": args.model, "dithered": args.dithered}
    results = []
    for ref in args.refs.split(","):
        model = refs[ref]
        if model is None:
            raise SystemExit(f"--refs {ref} needs --{ref}")
        f16, base = args.work / f"{ref}-F16.gguf", args.work / f"{ref}-F16.kld"
        f16_json = args.work / f"{ref}-F16.json"
        if not f16_json.is_file() or not base.is_file() or not f16.is_file():
            cmd = [
                sys.executable,
                "-m",
                "llmq",
                "convert",
                str(model),
                "-o",
                str(f16),
                "-f",
                "-q",
                "--quant",
                "F16",
            ]
            run_child(cmd)
            res = {"ref": ref, "row": "F16", "file_mib": f16.stat().st_size / 2**20}
            res.update(perplexity(binary, f16, args, base, save=True))
            f16_json.write_text(json.dumps(res, indent=1))
        results.append(json.loads(f16_json.read_text()))
        for spec in args.rows.split(","):
            results.append(row(ref, model, spec.strip(), f16, args, binary, base))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(
        f"\nWikiText-2 test, {args.chunks} chunks of 512; calibration {args.calib.name}, {args.samples} x {args.seqlen}\n"
    )
    print(
        "| reference | row | file MiB | file bytes | PPL | KL vs F16 | KL p99 | top-1 | convert s | peak RSS MiB |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        kl = f"{r['kl']:.5f} ± {r['kl_err']:.5f}" if "kl" in r else "—"
        p99 = f"{r['kl_p99']:.4f}" if r.get("kl_p99") is not None else "—"
        top1 = f"{r['top1']:.4f}" if "top1" in r else "—"
        conv = f"{r['convert_s']:.0f}" if "convert_s" in r else "—"
        rss = f"{r['rss_mib']:.0f}" if "rss_mib" in r else "—"
        print(
            f"| {r['ref']} | {r['row']} | {r['file_mib']:.1f} | {r.get('file_bytes', '—')} | {r['ppl']:.4f} ± {r['ppl_err']:.3f} | {kl} | {p99} "
            f"| {top1} | {conv} | {rss} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
