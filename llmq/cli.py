"""Command line: ``llmq convert`` and ``llmq inspect``."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

from .config import QuantConfig
from .errors import LlmqError


def _convert(args: argparse.Namespace) -> int:
    from .pipeline import convert

    if args.quant is not None and (args.bits is not None or args.group is not None or args.sym):
        raise LlmqError("--quant names a GGUF type; it cannot be combined with --bits/--group/--sym")
    cfg = QuantConfig(
        quant=args.quant,
        bits=4 if args.bits is None else args.bits,
        group_size=32 if args.group is None else args.group,
        sym=args.sym,
        embed_type=args.embed_type,
        method=args.method,
    )
    command = "llmq " + " ".join(shlex.quote(a) for a in args.argv)
    result = convert(
        args.src,
        args.output,
        cfg,
        overwrite=args.force,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
        write_card=not args.no_card,
        command=command,
    )
    print(result.summary())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import format_info, inspect_gguf

    print(format_info(inspect_gguf(args.file), tensors=not args.no_tensors))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmq", description="Weight-only LLM quantizer: HF checkpoint -> GGUF."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step decides")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "convert",
        help="quantize a Hugging Face checkpoint into a GGUF file",
        description="Quantize a Hugging Face checkpoint (local directory or hub id) into a GGUF file. "
        "Give either --quant NAME, or a group-wise scheme with --bits/--group/--sym "
        "(default: --bits 4 --group 32, asymmetric = Q4_1).",
    )
    c.add_argument("src", help="model directory (config.json + *.safetensors) or hub id owner/name")
    c.add_argument("-o", "--output", help="output .gguf path (default: <model>-<quant>.gguf here)")
    c.add_argument("--quant", help="GGUF type by llama.cpp's name: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 F16 BF16 F32")
    c.add_argument("--bits", type=int, help="bits per weight, 2..8 (GGUF stores 4, 5, 8); default 4")
    c.add_argument(
        "--group", type=int, help="values sharing a scale: a multiple of 32, or -1 per output row; default 32"
    )
    c.add_argument("--sym", action="store_true", help="symmetric quantization (no zero-point)")
    c.add_argument(
        "--embed-type", help="type of token embeddings and output (default Q8_0; F16 for float files)"
    )
    c.add_argument("--method", default="rtn", help="search before encoding: rtn (round to nearest)")
    c.add_argument("-f", "--force", action="store_true", help="overwrite the output if it exists")
    c.add_argument(
        "--allow-pickle", action="store_true", help="accept pickle .bin checkpoints (trusted sources)"
    )
    c.add_argument("--no-card", action="store_true", help="do not write the model card OUT.md")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=_convert)

    i = sub.add_parser(
        "inspect",
        help="show a GGUF file's metadata and tensors",
        description="Metadata summary, per-tensor type/shape/bytes and bits per weight.",
    )
    i.add_argument("file", help="a .gguf file")
    i.add_argument("--no-tensors", action="store_true", help="only metadata and the per-type summary")
    i.set_defaults(func=_inspect)
    return parser


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
        print(f"llmq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmq: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
