"""Judge GGUF files with llama.cpp itself, through llama-cpp-python.

Three tools: `perplexity` (llama-perplexity's exact protocol, so figures are comparable with
published llama.cpp numbers), `greedy_generate` (a temperature-0 smoke test) and
`quantize_with_llama_cpp` (llama-quantize's library entry point, the reference we compare against).

Example:
    >>> from llmq.eval.llamacpp import perplexity
    >>> text = open("wiki.test.raw", encoding="utf-8").read()
    >>> res = perplexity("model.Q4_0.gguf", text, n_chunks=40)
    >>> print(f"PPL = {res.ppl:.4f} +/- {res.ppl_stderr:.5f}")
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LlmqError, OutputExistsError, SourceError
from ._llama import (
    LlamaCppBackend,
    captured_llama_log,
    default_threads,
    llama_cpp,
    log_tail,
    open_llama,
    tokenize,
)
from .protocol import LogitsCallback, PerplexityResult, check_chunking, count_chunks, score_chunks

__all__ = [
    "FTYPES",
    "PerplexityResult",
    "greedy_generate",
    "perplexity",
    "quantize_with_llama_cpp",
]

# -- perplexity -----------------------------------------------------------------------------------


def perplexity(
    model_path: str | os.PathLike[str],
    text: str,
    *,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    n_threads: int | None = None,
    progress: bool = True,
    on_logits: LogitsCallback | None = None,
    flash_attn: bool = False,
) -> PerplexityResult:
    """Perplexity of a GGUF model on `text` with llama-perplexity's protocol.

    Mirrors `perplexity()` in llama.cpp's examples/perplexity/perplexity.cpp: the whole text is
    tokenized once; it is cut into non-overlapping chunks of `n_ctx` tokens; each chunk is decoded
    from an empty KV cache with its first token replaced by BOS when the vocab adds BOS; only the
    second half is scored (logits at positions n_ctx/2 .. n_ctx-2 predict the next token).
    `llmq.eval.evaluate` runs the same protocol on other backends and against a reference.

    Args:
        model_path: GGUF file.
        text: evaluation text (e.g. wiki.test.raw read as UTF-8).
        n_ctx: tokens per chunk (llama-perplexity's `-c`).
        n_chunks: chunks to evaluate at most (`--chunks`); None = all that fit.
        n_threads: CPU threads; None = every CPU this process may use.
        progress: show a tqdm bar with the running PPL.
        on_logits: called as `on_logits(chunk_index, logits)` after each chunk with a float32
            copy of shape `(n_scored, n_vocab)`: row i holds the logits at position
            `n_ctx // 2 + i`, which predict the chunk's token `n_ctx // 2 + i + 1`.
        flash_attn: use llama.cpp's flash-attention kernel. llama-perplexity's default ("auto")
            turns it on for CPU; its f16 arithmetic moved SmolLM2-135M's PPL by +0.4%, so it
            stays off unless matching that binary's figures matters more than accuracy.

    Returns:
        The PPL, its standard error, the running per-chunk PPL and per-token log-probs.

    Raises:
        LlmqError: bad `n_ctx`/`n_chunks`, or a text shorter than 2 * n_ctx tokens.
        SourceError: the GGUF is missing or llama.cpp cannot load it.

    Example:
        >>> res = perplexity("smollm2.Q8_0.gguf", text, n_chunks=40, progress=False)
        >>> res.n_tokens_scored
        10200
    """
    check_chunking(n_ctx, n_chunks)
    backend = LlamaCppBackend(
        open_llama(model_path, n_ctx=n_ctx, n_threads=n_threads, flash_attn=flash_attn), n_ctx
    )
    try:
        tokens = backend.tokenize(text)
        chunks = count_chunks(len(tokens), n_ctx, n_chunks)
        (result,), _ = score_chunks(
            [backend],
            tokens,
            n_ctx=n_ctx,
            n_chunks=chunks,
            add_bos=backend.add_bos,
            bos_id=backend.bos_id,
            progress=progress,
            on_logits=on_logits,
        )
    finally:
        backend.close()
    return result


# -- generation -----------------------------------------------------------------------------------


def greedy_generate(
    model_path: str | os.PathLike[str],
    prompt: str,
    n_tokens: int = 32,
    *,
    n_threads: int | None = None,
) -> str:
    """Continue `prompt` with the arg-max token at every step (temperature 0, no chat template).

    Args:
        model_path: GGUF file.
        prompt: raw text; BOS is prepended when the vocab says so.
        n_tokens: tokens to generate at most (stops early at an end-of-generation token).
        n_threads: CPU threads; None = half the usable CPUs per token, all of them for the prompt.

    Returns:
        The generated continuation only (the prompt is not repeated).

    Example:
        >>> greedy_generate("smollm2.gguf", "The capital of France is", 8)
        ' Paris. ...'
    """
    if n_tokens < 1:
        raise LlmqError(f"greedy_generate: n_tokens={n_tokens} must be at least 1")
    llm = open_llama(model_path, n_ctx=max(64, 2 * n_tokens), n_threads=n_threads)
    try:
        prompt_tokens = tokenize(llm, prompt).tolist()
        if not prompt_tokens:
            raise LlmqError("greedy_generate: the prompt is empty")
        if len(prompt_tokens) + n_tokens > llm.n_ctx():  # a long prompt: reopen with room for it
            llm.close()
            llm = open_llama(model_path, n_ctx=len(prompt_tokens) + n_tokens, n_threads=n_threads)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        out: list[int] = []
        with captured_llama_log():
            llm.reset()
            llm.eval(prompt_tokens)
            for _ in range(n_tokens):
                # Llama.eval asks logits for the batch's last token only; -1 reads that row.
                row = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)
                )
                token = int(np.argmax(row))  # first maximum, like llama_sampler_init_greedy
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                out.append(token)
                llm.eval([token])
        return llm.detokenize(out).decode("utf-8", "replace")
    finally:
        llm.close()


# -- quantization ---------------------------------------------------------------------------------


def _ftype_table() -> dict[str, int]:
    table = {
        name.removeprefix("LLAMA_FTYPE_MOSTLY_"): int(getattr(llama_cpp, name))
        for name in dir(llama_cpp)
        if name.startswith("LLAMA_FTYPE_MOSTLY_")
    }
    table["F32"] = int(llama_cpp.LLAMA_FTYPE_ALL_F32)
    # llama-quantize's aliases: the bare K names mean the _M mixes.
    for alias in ("Q3_K", "Q4_K", "Q5_K"):
        if f"{alias}_M" in table:
            table[alias] = table[f"{alias}_M"]
    return table


FTYPES: dict[str, int] = _ftype_table()
"""llama.cpp file-type names (as llama-quantize spells them) -> `LLAMA_FTYPE_*` values."""


def _imatrix_array(imatrix: Mapping[str, Any]) -> tuple[ctypes.Array[Any], list[np.ndarray]]:
    """Pack {tensor name: per-column importance} into the NULL-terminated C array llama.cpp reads."""
    if not imatrix:
        raise LlmqError("quantize_with_llama_cpp: imatrix is empty")
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed terminator last
    keep: list[np.ndarray] = []
    for i, (name, values) in enumerate(imatrix.items()):
        arr = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if arr.size == 0 or not np.isfinite(arr).all():
            raise LlmqError(f"quantize_with_llama_cpp: imatrix entry {name!r} is empty or not finite")
        keep.append(arr)
        entries[i].name = name.encode("utf-8")
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    return entries, keep


def quantize_with_llama_cpp(
    src_gguf: str | os.PathLike[str],
    dst_gguf: str | os.PathLike[str],
    ftype: str,
    *,
    imatrix: Mapping[str, Any] | None = None,
    allow_requantize: bool = False,
    overwrite: bool = False,
    n_threads: int | None = None,
) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (`llama_model_quantize`, as llama-quantize).

    Args:
        src_gguf: source GGUF (normally F32/F16/BF16).
        dst_gguf: output path; written under a temporary name and renamed when complete.
        ftype: llama.cpp file type, e.g. "Q4_0", "Q8_0", "F16", "Q4_K_M" (see `FTYPES`).
        imatrix: optional importance matrix, {tensor name: per-column mean squared activation}
            (n_embd values per weight, times n_expert for MoE); what llama-quantize loads
            from `--imatrix`, but without writing the quantize.imatrix.* metadata.
        allow_requantize: allow a source that is already quantized (llama-quantize's
            `--allow-requantize`; quality suffers).
        overwrite: replace `dst_gguf` if it exists.
        n_threads: quantization threads; None = every CPU this process may use.

    Returns:
        The output path.

    Raises:
        LlmqError: unknown `ftype`, bad imatrix, or llama.cpp refused (message says why).
        SourceError: the source is missing.
        OutputExistsError: `dst_gguf` exists and `overwrite` is False.

    Example:
        >>> quantize_with_llama_cpp("model.F16.gguf", "model.Q4_0.gguf", "Q4_0")
        PosixPath('model.Q4_0.gguf')
    """
    code = FTYPES.get(ftype.upper())
    if code is None:
        raise LlmqError(f"unknown llama.cpp ftype {ftype!r}; valid: {', '.join(sorted(FTYPES))}")
    src, dst = Path(src_gguf), Path(dst_gguf)
    if not src.is_file():
        raise SourceError(f"GGUF file not found: {src}")
    if dst.exists() and not overwrite:
        raise OutputExistsError(f"{dst} exists; pass overwrite=True to replace it")
    if dst.resolve() == src.resolve():
        raise LlmqError(f"quantize_with_llama_cpp: output {dst} is the source file")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.nthread = n_threads or default_threads()
    params.allow_requantize = allow_requantize
    # `packed` keeps the C array and the float buffers it points into alive through the call.
    packed = _imatrix_array(imatrix) if imatrix is not None else None
    if packed is not None:
        params.imatrix = ctypes.cast(packed[0], ctypes.POINTER(llama_cpp.llama_model_imatrix_data))

    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    try:
        with captured_llama_log() as lines:
            rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
        if rc != 0:
            hint = (
                ""
                if allow_requantize
                else " (if the source is already quantized, pass allow_requantize=True)"
            )
            raise LlmqError(f"llama.cpp could not quantize {src} to {ftype}{hint}{log_tail(lines)}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
