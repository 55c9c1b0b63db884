"""llama.cpp plumbing: import check, log capture, model loading, the llama.cpp eval backend.

Private: the public tools live in `llmq.eval.llamacpp` and `llmq.eval.evaluate`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import SourceError

try:
    import llama_cpp
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "llmq.eval.llamacpp needs llama.cpp's Python bindings: pip install llama-cpp-python"
    ) from exc

_log = logging.getLogger(__name__)

# ggml_log_level values of the bundled ggml (llama-cpp-python's own _logger maps an older enum).
_GGML_LOG_WARN, _GGML_LOG_ERROR, _GGML_LOG_CONT = 3, 4, 5


@contextlib.contextmanager
def captured_llama_log() -> Iterator[deque[tuple[int, str]]]:
    """Route llama.cpp's global log into a buffer of its warnings and errors while active.

    llama.cpp prints its loader dump and per-tensor quantize lines at INFO; we drop those and keep
    the last warnings/errors so a failure (`llama_model_quantize` returns only 1) can say why.
    The logger is process-global (`llama_log_set`): not for concurrent use from several threads.
    """
    lines: deque[tuple[int, str]] = deque(maxlen=40)
    last_level = [0]

    @llama_cpp.llama_log_callback
    def sink(level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
        if level != _GGML_LOG_CONT:
            last_level[0] = level
        if last_level[0] >= _GGML_LOG_WARN and text:
            line = text.decode("utf-8", "replace")
            lines.append((last_level[0], line))
            _log.debug("llama.cpp: %s", line.rstrip())

    prev_cb, prev_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_data))
    llama_cpp.llama_log_set(sink, None)
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(prev_cb, prev_data)


def log_tail(lines: deque[tuple[int, str]]) -> str:
    """The captured errors (else the last warnings) as a suffix for an error message ("" if none)."""
    errors = [text for level, text in lines if level >= _GGML_LOG_ERROR]
    text = "".join(errors or [text for _, text in list(lines)[-3:]]).strip()
    return f"; llama.cpp said: {text}" if text else ""


@contextlib.contextmanager
def no_weight_repacking() -> Iterator[None]:
    """Load models without llama.cpp's extra CPU buffer types (weight repacking, AMX), as ``-nr``.

    llama.cpp's repacked CPU kernels (`use_extra_bufts`, on by default) crash with a segmentation
    fault in `llama_decode` on CPUs with AMX (seen with llama-cpp-python 0.3.36 on Sapphire Rapids,
    for Q4_0, Q4_1, Q8_0 and K-quant files alike); the plain CPU path computes the same quantized dot
    products. `llama_cpp.Llama` has no argument for it, so the defaults it starts from are changed
    while one is constructed; `llama-perplexity` gets ``--no-repack`` to match.
    """
    module = llama_cpp.llama_cpp
    defaults = module.llama_model_default_params

    def without_repacking() -> llama_cpp.llama_model_params:
        params = defaults()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = without_repacking
    try:
        yield
    finally:
        module.llama_model_default_params = defaults


def default_threads() -> int:
    # The CPUs this process may run on (affinity aware); llama.cpp's CLI counts physical cores.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def open_llama(
    model_path: str | os.PathLike[str],
    *,
    n_ctx: int,
    n_threads: int | None,
    kv_overrides: dict[str, bool | int | float | str] | None = None,
    flash_attn: bool = False,
) -> llama_cpp.Llama:
    """Load a GGUF with one context of `n_ctx` tokens and one batch of the same size.

    `n_threads=None` follows llama.cpp's defaults: every usable CPU for batches, half of them for
    one-token steps (OpenMP barriers per token make extra threads a loss there, badly so when
    another process competes for the cores).
    """
    path = Path(model_path)
    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}")
    threads_batch = n_threads or default_threads()
    threads = n_threads or max(1, threads_batch // 2)
    with captured_llama_log() as lines, no_weight_repacking():
        try:
            return llama_cpp.Llama(
                str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=min(n_ctx, 512),
                logits_all=False,  # we read logits through the C API, not Llama.scores
                verbose=False,
                seed=0,
                n_threads=threads,
                n_threads_batch=threads_batch,
                kv_overrides=kv_overrides,
                flash_attn=flash_attn,
            )
        except ValueError as exc:
            raise SourceError(f"llama.cpp cannot load {path}: {exc}{log_tail(lines)}") from exc


def tokenize(llm: llama_cpp.Llama, text: str) -> np.ndarray:
    """The whole text as int32 token ids, as llama-perplexity tokenizes it."""
    # add_special=True: BOS is prepended exactly when the vocab says so (common_tokenize(..., true)).
    return np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), dtype=np.int32)


def open_vocab(model_path: str | os.PathLike[str]) -> llama_cpp.Llama:
    """Load only a GGUF's vocabulary (no weights): llama.cpp's tokenizer for that file."""
    path = Path(model_path)
    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}")
    with captured_llama_log() as lines:
        try:
            return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        except ValueError as exc:
            raise SourceError(f"llama.cpp cannot load {path}: {exc}{log_tail(lines)}") from exc


def vocab_bos(llm: llama_cpp.Llama) -> tuple[bool, int | None]:
    """(add_bos, bos_id) as the vocab says: llama_vocab_get_add_bos and llama_vocab_bos."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos = int(llama_cpp.llama_vocab_bos(vocab))
    return bool(llama_cpp.llama_vocab_get_add_bos(vocab)), (bos if bos >= 0 else None)


class LlamaCppBackend:
    """A GGUF run by llama.cpp behind the perplexity protocol (`llmq.eval.protocol.Backend`).

    Args:
        llm: a model opened by `open_llama` with a context of `n_ctx` tokens; closed by `close`.
        n_ctx: tokens per chunk.
    """

    name = "llama.cpp"

    def __init__(self, llm: llama_cpp.Llama, n_ctx: int) -> None:
        self.llm = llm
        self.n_ctx = n_ctx
        self.n_vocab = int(llm.n_vocab())
        self.add_bos, self.bos_id = vocab_bos(llm)
        first = n_ctx // 2
        self._first = first
        self._memory = llama_cpp.llama_get_memory(llm.ctx)
        self._batch: llama_cpp.llama_batch | None = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        # Positions, sequence ids and the output mask are the same for every chunk; only
        # positions first .. n_ctx-2 get logits (perplexity.cpp asks for pos >= first).
        batch = self._batch
        batch.n_tokens = n_ctx
        for i in range(n_ctx):
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = first <= i < n_ctx - 1
        self._tokens = np.ctypeslib.as_array(batch.token, shape=(n_ctx,))

    def tokenize(self, text: str) -> np.ndarray:
        return tokenize(self.llm, text)

    def logits(self, chunk: np.ndarray) -> np.ndarray:
        if self._batch is None:
            raise RuntimeError("LlamaCppBackend is closed")
        if len(chunk) != self.n_ctx:
            raise ValueError(f"chunk of {len(chunk)} tokens; this context holds {self.n_ctx}")
        self._tokens[:] = chunk
        with captured_llama_log() as lines:
            llama_cpp.llama_memory_clear(self._memory, True)  # a fresh context per chunk
            rc = llama_cpp.llama_decode(self.llm.ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}{log_tail(lines)}")
        # The rows of the output positions, in order; valid until the next decode.
        return np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self.llm.ctx, self._first),
            shape=(self.n_ctx - 1 - self._first, self.n_vocab),
        )

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
            self.llm.close()
