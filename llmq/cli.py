"""Command line: ``llmq convert``, ``llmq inspect`` and ``llmq eval``."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import QuantConfig
from .errors import LlmqError


def _convert(args: argparse.Namespace) -> int:
    from .pipeline import convert

    if args.quant is not None and (args.bits is not None or args.group is not None or args.sym):
        raise LlmqError("--quant names a GGUF type; it cannot be combined with --bits/--group/--sym")
    if args.method is None:  # an importance matrix from a file weighs round-to-nearest, as llama-quantize
        args.method = "rtn" if args.imatrix is not None else "awq"
    from .mixes import parse_tensor_types

    cfg = QuantConfig(
        quant=args.quant,
        bits=4 if args.bits is None else args.bits,
        group_size=32 if args.group is None else args.group,
        sym=args.sym,
        embed_type=args.embed_type,
        method=args.method,
        tensor_types=parse_tensor_types(args.tensor_type or []),
    )
    calib_opts = [o for o in ("calib", "calib_samples", "calib_seqlen") if getattr(args, o) is not None]
    if cfg.method != "awq" and calib_opts:
        raise LlmqError(
            f"--{calib_opts[0].replace('_', '-')} applies to --method awq, not --method {cfg.method}"
        )
    from .calib import DEFAULT_SOURCE, CalibConfig
    from .distributed import world

    calib = CalibConfig(
        args.calib or DEFAULT_SOURCE,
        n_samples=128 if args.calib_samples is None else args.calib_samples,
        seqlen=512 if args.calib_seqlen is None else args.calib_seqlen,
        seed=args.seed,
    )
    command = "llmq " + " ".join(shlex.quote(a) for a in args.argv)
    result = convert(
        args.src,
        args.output,
        cfg,
        formats=args.format,
        calib=calib,
        imatrix=args.imatrix,
        device=args.device,
        overwrite=args.force,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
        command=command,
        resume=args.resume,
    )
    if world()[0] == 0:  # under torchrun, the process that wrote the outputs
        print(result.summary())
    return 0


def _imatrix(args: argparse.Namespace) -> int:
    from .calib import DEFAULT_SOURCE, CalibConfig
    from .imatrix import imatrix_file
    from .writers import check_output

    calib = CalibConfig(
        args.calib or DEFAULT_SOURCE,
        n_samples=args.calib_samples,
        seqlen=args.calib_seqlen,
        batch_size=args.calib_batch,
        seed=args.seed,
    )
    out = Path(args.output)
    check_output(out, overwrite=args.force)  # before the calibration forwards, as convert does
    path = imatrix_file(
        args.src, out, calib, device=args.device, progress=not args.quiet, legacy=args.format == "dat"
    )
    print(f"wrote {path} (importance matrix, {calib.n_samples} x {calib.seqlen} tokens of {calib.source})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import format_info, inspect_gguf

    print(format_info(inspect_gguf(args.file), tensors=not args.no_tensors))
    return 0


FORMATS_HELP = ("gguf", "compressed-tensors", "awq")

# Where the project keeps WikiText-2 (the shared data folder beside the repo), relative to the CWD.
DEFAULT_TEXT = Path("../shared/data/wikitext-2-raw/wiki.test.raw")


def _eval(args: argparse.Namespace) -> int:
    from .eval.backends import check_backend_name

    check_backend_name(args.backend, option="backend")  # before llama.cpp and torch load
    check_backend_name(args.ref_backend, option="ref_backend")
    text = Path(args.text) if args.text is not None else DEFAULT_TEXT
    if not text.is_file():
        if args.text is None:
            raise LlmqError(f"no evaluation text: {DEFAULT_TEXT} does not exist here; pass --text FILE")
        raise LlmqError(f"--text: file not found: {text}")
    from .eval.evaluation import evaluate

    result = evaluate(
        args.model,
        text,
        ref=args.ref,
        backend=args.backend,
        ref_backend=args.ref_backend,
        n_chunks=args.chunks,
        n_ctx=args.ctx,
        n_threads=args.threads,
        progress=not args.quiet,
        exact_activations=args.exact_activations,
    )
    # With --json -, stdout carries only the JSON; the report goes to stderr.
    print(result.report(), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json is not None:
        payload = json.dumps(result.to_dict(), indent=2)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload + "\n", encoding="utf-8")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmq",
        description="Weight-only LLM quantizer: HF checkpoint -> GGUF (llama.cpp) and safetensors (transformers, vLLM).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step decides")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "convert",
        help="quantize a Hugging Face checkpoint into GGUF and/or safetensors checkpoints",
        description="Quantize a Hugging Face checkpoint (local directory or hub id) into a GGUF file "
        "(llama.cpp), a compressed-tensors or an AutoAWQ checkpoint (transformers, vLLM), or several of "
        "them from one search. Give either --quant NAME, or a group-wise scheme with --bits/--group/--sym "
        "(default: --bits 4 --group 32, asymmetric = Q4_1). The default method, AWQ, calibrates on "
        "--calib (default: the multi-domain text shipped with llmq) with the settings measured best for the "
        "type (see README).",
    )
    c.add_argument("src", help="model directory (config.json + *.safetensors) or hub id owner/name")
    io = c.add_argument_group("input and output")
    io.add_argument(
        "-o",
        "--output",
        help="output path of the first format (default: <model>-<quant>.gguf, or a directory)",
    )
    io.add_argument(
        "--format",
        default="gguf",
        metavar="FMT[,FMT]",
        help=f"output formats, comma-separated, written from one search: {', '.join(FORMATS_HELP)} "
        "(default gguf; further outputs go beside the first)",
    )
    io.add_argument("-f", "--force", action="store_true", help="overwrite outputs that exist")
    io.add_argument(
        "--allow-pickle", action="store_true", help="accept pickle .bin checkpoints (trusted sources)"
    )
    q = c.add_argument_group("quantization")
    q.add_argument(
        "--quant",
        help="GGUF type (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K F16 BF16 F32) or llama.cpp mix "
        "(Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K: per-tensor types as llama-quantize)",
    )
    q.add_argument("--bits", type=int, help="bits per weight: 4, 5 or 8 (default 4)")
    q.add_argument(
        "--group",
        type=int,
        help="values sharing a scale: a multiple of 32, or -1 per output row (default 32)",
    )
    q.add_argument("--sym", action="store_true", help="symmetric quantization (no zero-point)")
    q.add_argument(
        "--tensor-type",
        action="append",
        metavar="PATTERN=TYPE",
        help="store tensors whose GGUF name matches the regex PATTERN as TYPE (repeatable, first match "
        "wins; e.g. ffn_down=Q6_K), as llama-quantize --tensor-type",
    )
    q.add_argument(
        "--embed-type", help="GGUF type of token embeddings and output (default Q8_0; F16 for float files)"
    )
    q.add_argument(
        "--method",
        choices=("awq", "rtn"),
        help="awq (default): activation-aware search and importance-weighted encoding; rtn: round to "
        "nearest, no calibration, llama.cpp's bytes (default with --imatrix)",
    )
    q.add_argument(
        "--imatrix",
        metavar="FILE",
        help="importance matrix (llama.cpp GGUF or .dat) weighing round-to-nearest encoding; implies --method rtn",
    )
    a = c.add_argument_group("calibration (--method awq)")
    a.add_argument(
        "--calib",
        metavar="SRC",
        help="calibration text: builtin (default: a multi-domain text shipped with llmq, offline), a file "
        "(plain text, or .jsonl with a 'text' field), hub:<owner/dataset>[/file], or self: sampled from the model",
    )
    a.add_argument(
        "--calib-samples",
        type=int,
        metavar="N",
        help="calibration windows (default 128; builtin: the distinct windows it holds)",
    )
    a.add_argument("--calib-seqlen", type=int, metavar="L", help="tokens per window (default 512)")
    a.add_argument("--seed", type=int, default=0, help="seed of window offsets and self-sampling (default 0)")
    r = c.add_argument_group("run")
    r.add_argument(
        "--device", default="cpu", help="where calibration forwards run: cpu (default), cuda, cuda:1 ..."
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run of the same command from the layers it kept in OUT.llmq-work",
    )
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what each step decides"
    )
    c.set_defaults(func=_convert)

    m = sub.add_parser(
        "imatrix",
        help="compute an importance matrix (mean x^2 per input column) in llama.cpp's format",
        description="Run calibration text through the model layer by layer and write llama.cpp's GGUF "
        "imatrix (or legacy .dat), for `llmq convert --imatrix` or llama-quantize --imatrix.",
    )
    m.add_argument("src", help="model directory or hub id")
    m.add_argument("-o", "--output", required=True, help="output file (.gguf, or .dat with --format dat)")
    m.add_argument("--format", choices=("gguf", "dat"), default="gguf", help="file format (default gguf)")
    m.add_argument("--calib", metavar="SRC", help="calibration text, as for convert (default: builtin)")
    m.add_argument("--calib-samples", type=int, default=128, metavar="N", help="windows (default 128)")
    m.add_argument(
        "--calib-seqlen", type=int, default=512, metavar="L", help="tokens per window (default 512)"
    )
    m.add_argument("--calib-batch", type=int, default=8, metavar="B", help="windows per forward (default 8)")
    m.add_argument("--seed", type=int, default=0, help="seed of window offsets (default 0)")
    m.add_argument("--device", default="cpu", help="where the forwards run (default cpu)")
    m.add_argument("-f", "--force", action="store_true", help="overwrite the output if it exists")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    m.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what each step decides"
    )
    m.set_defaults(func=_imatrix)

    i = sub.add_parser(
        "inspect",
        help="show a GGUF file's metadata and tensors",
        description="Metadata summary, per-tensor type/shape/bytes and bits per weight.",
    )
    i.add_argument("file", help="a .gguf file")
    i.add_argument("--no-tensors", action="store_true", help="only metadata and the per-type summary")
    i.set_defaults(func=_inspect)

    e = sub.add_parser(
        "eval",
        help="perplexity (and KL divergence against a reference) with llama-perplexity's protocol",
        description="Perplexity of a Hugging Face checkpoint or a GGUF file on a text, with "
        "llama-perplexity's protocol (non-overlapping chunks, second half of each scored). With --ref, "
        "also the KL divergence of the model's token distributions from the reference's and their "
        "top-1 agreement, as llama-perplexity --kl-divergence reports.",
    )
    e.add_argument("model", help="a .gguf file, or a Hugging Face checkpoint directory or hub id")
    e.add_argument(
        "--text", metavar="FILE", help=f"UTF-8 evaluation text (default: {DEFAULT_TEXT} if it exists)"
    )
    e.add_argument(
        "--ref",
        metavar="REF",
        help="reference model (GGUF or checkpoint) for KL divergence and top-1 agreement",
    )
    e.add_argument(
        "--backend",
        default="auto",
        metavar="NAME",
        help="torch (HF checkpoint), llama.cpp or numpy (GGUF through llmq's reference kernels); "
        "auto = torch for a checkpoint, llama.cpp for a GGUF",
    )
    e.add_argument("--ref-backend", default="auto", metavar="NAME", help="backend of --ref (same choices)")
    e.add_argument("--chunks", type=int, metavar="N", help="evaluate at most N chunks (default: all)")
    e.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per chunk (default 512)")
    e.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT ('-' = stdout)")
    e.add_argument(
        "--exact-activations",
        action="store_true",
        help="numpy backend: keep linear inputs float32 (default: round them to 8 bits / f16 as llama.cpp's CPU does)",
    )
    e.add_argument("--threads", type=int, metavar="N", help="CPU threads for llama.cpp and torch")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what each step decides"
    )
    e.set_defaults(func=_eval)
    return parser


# Library errors name the Python config fields (``group_size=64``); the CLI shows its own flags.
_FLAGS = {
    "quant": "--quant",
    "bits": "--bits",
    "group_size": "--group",
    "method": "--method",
    "format": "--format",
    "seqlen": "--calib-seqlen",
    "backend": "--backend",
    "ref_backend": "--ref-backend",
}
_SWITCHES = {
    "sym=True": "--sym",
    "allow_pickle=True": "--allow-pickle",
    "overwrite=True": "--force",
    "resume=True": "--resume",
}
_FIELD = re.compile(r"\b(" + "|".join(_FLAGS) + r")=")


def cli_message(message: str) -> str:
    """A library error's text with each config field (``group_size=64``) as its flag (``--group 64``)."""
    for field, flag in _SWITCHES.items():
        message = message.replace(field, flag)
    return _FIELD.sub(lambda m: _FLAGS[m.group(1)] + " ", message)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.func(args))
    except LlmqError as e:
        print(f"llmq: error: {cli_message(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, an unwritable directory: the outputs were removed
        print(f"llmq: error: {e}; no output written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmq: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
