"""`llmq.eval.perplexity` agrees with llama.cpp's own `llama-perplexity` on the same GGUF files.

The binary is built once from the installed llama-cpp-python's sdist (the same llama.cpp sources as
the bindings) by tools/build_llama_perplexity.py and cached beside the reference model; the first
run spends about ten minutes compiling on two cores. Both sides run with flash attention off, a
512-token context and the same thread count, on WikiText-2's test split.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import load_tool

import llmq
from llmq.eval import perplexity

pytestmark = pytest.mark.integration

REL_TOL = 0.005  # 0.5 %
N_CHUNKS_SHIPPED = (
    10  # agreement is to the printed digit, so a few chunks prove it (40 measured: 22.5704 both)
)
N_CHUNKS_LLMQ = 10  # llmq-written files (20 measured: F16, Q8_0, Q4_0 equal to 1e-6)
# ggml's spin barriers make two threads much slower whenever another process shares the cores
# (see test_eval_llamacpp.py); both sides use the same count.
THREADS = 1


TOOL = load_tool("build_llama_perplexity")


@pytest.fixture(scope="session")
def llama_perplexity_bin(test_cache_dir: Path) -> Path:
    """llama.cpp's `llama-perplexity`, built (about 10 min) and cached on first use; never skipped."""
    try:
        return TOOL.build_llama_perplexity(test_cache_dir)
    except Exception as exc:  # a build failure is a test failure, with the log's tail
        pytest.fail(f"building llama-perplexity failed: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def wikitext(wikitext_path: Path) -> str:
    # bytes -> str without newline translation: exactly the text the binary reads from the file
    return wikitext_path.read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def llmq_files(reference_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ppl-tool")
    return {
        quant: llmq.convert(
            reference_model_dir,
            out / f"smol-{quant}.gguf",
            llmq.QuantConfig(method="rtn", quant=quant),
            progress=False,
            write_card=False,
        ).path
        for quant in ("F16", "Q8_0", "Q4_0")
    }


def _compare(
    binary: Path, model: Path, wikitext: str, wikitext_path: Path, n_chunks: int, label: str
) -> None:
    ours = perplexity(model, wikitext, n_chunks=n_chunks, n_threads=THREADS, progress=False)
    theirs = TOOL.llama_perplexity_report(binary, model, wikitext_path, n_chunks, threads=THREADS)
    rel = abs(ours.ppl - theirs.ppl) / theirs.ppl
    print(
        f"\n{label}: {n_chunks} chunks x {ours.n_ctx} tokens: llmq PPL = {ours.ppl:.4f} +/- {ours.ppl_stderr:.4f}"
        f" ({ours.seconds:.0f} s), llama-perplexity PPL = {theirs.ppl:.4f} +/- {theirs.ppl_stderr:.4f}"
        f" ({theirs.seconds:.0f} s), relative difference {100 * rel:.4f} %"
    )
    assert theirs.n_chunks == ours.n_chunks == n_chunks, theirs.output[-2000:]
    assert theirs.n_ctx == ours.n_ctx == 512
    assert len(theirs.chunk_ppl) == n_chunks  # it printed a running figure for every chunk
    assert rel < REL_TOL, f"{label}: llmq {ours.ppl} vs llama-perplexity {theirs.ppl}"


def test_cached_binary_is_self_contained(llama_perplexity_bin: Path) -> None:
    entry = llama_perplexity_bin.parent.parent
    assert entry.name == f"llama.cpp-{importlib.metadata.version('llama-cpp-python')}"
    # built with BUILD_SHARED_LIBS=OFF: nothing but the binaries themselves is needed from the cache
    assert sorted(p.name for p in llama_perplexity_bin.parent.iterdir()) == sorted(TOOL.BINARIES)
    if shutil.which("ldd"):
        for name in TOOL.BINARIES:
            binary = llama_perplexity_bin.parent / name
            deps = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
            assert "not found" not in deps and "libllama" not in deps and "libggml" not in deps, (name, deps)
    # a second call finds the cached binary without building again
    assert TOOL.build_llama_perplexity(entry.parent, log=pytest.fail) == llama_perplexity_bin


def test_shipped_q4_1_matches_llama_perplexity(
    llama_perplexity_bin: Path, smollm2_gguf_path: Path, wikitext: str, wikitext_path: Path
) -> None:
    _compare(
        llama_perplexity_bin, smollm2_gguf_path, wikitext, wikitext_path, N_CHUNKS_SHIPPED, "shipped Q4_1"
    )


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_0"])
def test_llmq_file_matches_llama_perplexity(
    llama_perplexity_bin: Path, llmq_files: dict[str, Path], wikitext: str, wikitext_path: Path, quant: str
) -> None:
    _compare(llama_perplexity_bin, llmq_files[quant], wikitext, wikitext_path, N_CHUNKS_LLMQ, f"llmq {quant}")


def test_run_llama_perplexity_raises_with_the_output_tail(tmp_path: Path) -> None:
    fake = tmp_path / "llama-perplexity"
    fake.write_text('#!/bin/sh\necho "llama_model_load: error loading model: $*"\nexit 3\n')
    fake.chmod(0o755)
    with pytest.raises(
        RuntimeError, match=r"exit 3.*\n.*error loading model: -m m\.gguf -f t\.txt -c 512 --chunks 2 -fa off"
    ):
        TOOL.run_llama_perplexity(fake, "m.gguf", "t.txt", 2)
