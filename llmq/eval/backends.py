"""Evaluation backends: which engine runs a model, and the torch (Hugging Face) one.

Three backends implement `llmq.eval.protocol.Backend`:

- ``torch``: a Hugging Face checkpoint through transformers in float32 (the FP reference);
- ``llama.cpp``: a GGUF through llama-cpp-python (`llmq.eval._llama.LlamaCppBackend`);
- ``numpy``: a GGUF through llmq's reference kernels (`llmq.eval.numpy_backend`).

Example:
    >>> backend = open_backend("smollm2.Q4_0.gguf", "numpy", n_ctx=512)
    >>> tokens = backend.tokenize(text)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import LlmqError, SourceError
from ..source import resolve_source
from .protocol import Backend

BACKENDS = ("auto", "torch", "llama.cpp", "numpy")
"""Backend names `open_backend` accepts; auto = torch for a checkpoint, llama.cpp for a GGUF."""

GGUF_BACKENDS = ("llama.cpp", "numpy")


def is_gguf(model: str | os.PathLike[str]) -> bool:
    """Whether `model` names a GGUF file: by its magic when it exists, else by its .gguf suffix."""
    path = Path(model).expanduser()
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) == b"GGUF":
                return True
    return path.suffix.lower() == ".gguf"


def check_backend_name(backend: str, *, option: str = "backend") -> None:
    """Raise `LlmqError` for a backend name not in `BACKENDS` (``option`` names the setting)."""
    if backend not in BACKENDS:
        raise LlmqError(f"{option}={backend}: unknown backend; choose one of {', '.join(BACKENDS)}")


def resolve_backend(model: str | os.PathLike[str], backend: str, *, option: str = "backend") -> str:
    """The backend that runs `model`: `backend` itself, checked, or the auto choice.

    Raises:
        LlmqError: unknown backend name, or one that cannot run this kind of model.
    """
    check_backend_name(backend, option=option)
    gguf_model = is_gguf(model)
    if backend == "auto":
        return "llama.cpp" if gguf_model else "torch"
    if gguf_model and backend == "torch":
        raise LlmqError(
            f"{model}: the torch backend runs Hugging Face checkpoints, not GGUF files; "
            f"use {option}=llama.cpp or {option}=numpy"
        )
    if not gguf_model and backend in GGUF_BACKENDS:
        raise LlmqError(
            f"{model}: the {backend} backend runs GGUF files; "
            f"a Hugging Face checkpoint runs with {option}=torch"
        )
    return backend


def open_backend(
    model: str | os.PathLike[str],
    backend: str = "auto",
    *,
    n_ctx: int = 512,
    n_threads: int | None = None,
    option: str = "backend",
    exact_activations: bool = False,
) -> Backend:
    """Load `model` on a backend, ready to score chunks of `n_ctx` tokens.

    Args:
        model: a GGUF file, a Hugging Face checkpoint directory or a hub id.
        backend: one of `BACKENDS`.
        n_ctx: tokens per chunk (llama.cpp sizes its context to it).
        n_threads: CPU threads (llama.cpp's threads, torch's intra-op threads); None = defaults.
        option: the option named in error messages.
        exact_activations: numpy backend only: keep linear inputs float32 instead of rounding them
            as llama.cpp's CPU backend does.

    Returns:
        A `Backend`; call its `close()` when done.

    Raises:
        LlmqError: bad backend name or kind of model.
        SourceError: the model is missing or cannot be loaded.

    Example:
        >>> open_backend("SmolLM2-135M-Instruct", "torch").n_vocab
        49152
    """
    kind = resolve_backend(model, backend, option=option)
    if kind == "llama.cpp":
        from ._llama import LlamaCppBackend, open_llama

        return LlamaCppBackend(open_llama(model, n_ctx=n_ctx, n_threads=n_threads), n_ctx)
    if kind == "numpy":
        from .numpy_backend import NumpyBackend

        return NumpyBackend(model, n_threads=n_threads, round_activations=not exact_activations)
    return TorchBackend(resolve_source(model), n_threads=n_threads)


class TorchBackend:
    """A Hugging Face checkpoint in float32 through transformers, behind the perplexity protocol.

    Args:
        model_dir: checkpoint directory (config.json, weights, tokenizer files).
        n_threads: torch intra-op threads (process-wide); None leaves torch's setting.
    """

    name = "torch"

    def __init__(self, model_dir: str | os.PathLike[str], *, n_threads: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise SourceError(f"{model_dir}: no config.json; expected a Hugging Face checkpoint directory")
        if n_threads:
            torch.set_num_threads(n_threads)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise SourceError(f"transformers cannot load {model_dir}: {exc}") from exc
        self.model.eval()
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        # The whole test text is one sequence: no "longer than the maximum length" warning.
        self.tokenizer.model_max_length = 1 << 62
        bos = self.tokenizer.bos_token_id
        self.bos_id = None if bos is None else int(bos)
        # Whether the tokenizer prepends BOS, judged by what it does rather than by a flag.
        with_special = self.tokenizer("a")["input_ids"]
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        self.add_bos = bool(
            self.bos_id is not None and len(with_special) > len(plain) and with_special[0] == self.bos_id
        )

    def tokenize(self, text: str) -> np.ndarray:
        # add_special_tokens=True: BOS/EOS exactly as the tokenizer adds them (common_tokenize(..., true)).
        return np.asarray(self.tokenizer(text, add_special_tokens=True)["input_ids"], dtype=np.int64)

    @torch.inference_mode()
    def logits(self, chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        first = n // 2
        ids = torch.from_numpy(np.asarray(chunk, dtype=np.int64))[None]
        # logits_to_keep: lm_head runs only on positions first .. n-1; the last one predicts nothing.
        out = self.model(input_ids=ids, use_cache=False, logits_to_keep=n - first)
        return out.logits[0, :-1].float().numpy()

    def close(self) -> None:
        del self.model
