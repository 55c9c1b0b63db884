"""`evaluate`: perplexity of a model on any backend, optionally with KL divergence against a reference.

What ``llmq eval`` runs. One protocol (`llmq.eval.protocol`, llama-perplexity's) for every backend,
and one token stream for every model of a run: llama.cpp's tokenizer of the GGUF when a GGUF is
involved, else the Hugging Face tokenizer.

Example:
    >>> from llmq.eval import evaluate
    >>> res = evaluate("smol.Q4_0.gguf", Path("wiki.test.raw"), ref="smol.F16.gguf", n_chunks=40)
    >>> print(res.report())
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LlmqError, SourceError
from .backends import is_gguf, open_backend, resolve_backend
from .protocol import Backend, KLStats, PerplexityResult, check_chunking, count_chunks, score_chunks


@dataclass(frozen=True)
class EvalResult:
    """The outcome of `evaluate`.

    Attributes:
        model: the evaluated model (path or hub id, as given).
        backend: the backend that ran it ("torch", "llama.cpp", "numpy").
        perplexity: its perplexity statistics.
        text_tokens: tokens in the whole text (the chunks come from their first n_chunks * n_ctx).
        ref: the reference model, or None.
        ref_backend: the backend that ran the reference, or None.
        ref_perplexity: the reference's perplexity statistics on the same tokens, or None.
        kl: KL(ref || model) and top-1 agreement statistics, or None.
        seconds: wall time of the whole run, loading included.
    """

    model: str
    backend: str
    perplexity: PerplexityResult
    text_tokens: int
    ref: str | None = None
    ref_backend: str | None = None
    ref_perplexity: PerplexityResult | None = None
    kl: KLStats | None = None
    seconds: float = 0.0

    @property
    def ppl(self) -> float:
        """The model's perplexity."""
        return self.perplexity.ppl

    @property
    def ln_ppl_ratio(self) -> tuple[float, float]:
        """Mean ln(PPL(model)/PPL(ref)) and its standard error (paired over tokens), as llama.cpp."""
        if self.ref_perplexity is None:
            raise LlmqError("ln_ppl_ratio needs a reference model")
        diff = self.ref_perplexity.token_logprobs - self.perplexity.token_logprobs
        stderr = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
        return float(diff.mean()), stderr

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``llmq eval --json`` writes); no per-token arrays."""
        p = self.perplexity
        out: dict[str, Any] = {
            "model": self.model,
            "backend": self.backend,
            "n_ctx": p.n_ctx,
            "n_chunks": p.n_chunks,
            "n_tokens": p.n_tokens_scored,
            "text_tokens": self.text_tokens,
            "add_bos": p.add_bos,
            "ppl": p.ppl,
            "ppl_stderr": p.ppl_stderr,
            "nll_mean": p.nll_mean,
            "nll_stderr": p.nll_stderr,
            "chunk_ppl": list(p.chunk_ppl),
            "seconds": p.seconds,
            "tokens_per_second": p.tokens_per_second,
        }
        if self.ref_perplexity is not None and self.kl is not None:
            r, kl = self.ref_perplexity, self.kl
            ln_ratio, ln_ratio_se = self.ln_ppl_ratio
            out.update(
                ref=self.ref,
                ref_backend=self.ref_backend,
                ref_ppl=r.ppl,
                ref_ppl_stderr=r.ppl_stderr,
                ref_seconds=r.seconds,
                ppl_ratio=p.ppl / r.ppl,
                ln_ppl_ratio=ln_ratio,
                ln_ppl_ratio_stderr=ln_ratio_se,
                kl={"mean": kl.mean, "stderr": kl.stderr, "median": kl.median, "p99": kl.p99, "max": kl.max},
                top1=kl.top1,
                top1_stderr=kl.top1_stderr,
            )
        out["total_seconds"] = self.seconds
        return out

    def report(self) -> str:
        """Human-readable figures, worded like llama-perplexity's final lines."""
        p = self.perplexity
        lines = [
            f"model: {self.model} ({self.backend}), {p.n_chunks} chunks of {p.n_ctx} tokens, "
            f"{p.n_tokens_scored} scored, {p.seconds:.1f} s ({p.tokens_per_second:.0f} tokens/s)",
            ",".join(f"[{i + 1}]{v:.4f}" for i, v in enumerate(p.chunk_ppl)),
            f"Final estimate: PPL = {p.ppl:.4f} +/- {p.ppl_stderr:.5f}",
        ]
        if self.ref_perplexity is None or self.kl is None:
            return "\n".join(lines)
        r, kl = self.ref_perplexity, self.kl
        ln_ratio, ln_ratio_se = self.ln_ppl_ratio
        lines += [
            f"ref:   {self.ref} ({self.ref_backend}), {r.seconds:.1f} s",
            "",
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {p.ppl:10.6f} ± {p.ppl_stderr:10.6f}",
            f"Mean PPL(base)                : {r.ppl:10.6f} ± {r.ppl_stderr:10.6f}",
            f"Mean ln(PPL(Q)/PPL(base))     : {ln_ratio:10.6f} ± {ln_ratio_se:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {math.exp(ln_ratio):10.6f} ± {math.exp(ln_ratio) * ln_ratio_se:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {kl.mean:10.6f} ± {kl.stderr:10.6f}",
            f"Maximum KLD: {kl.max:10.6f}",
            f"99.0%   KLD: {kl.p99:10.6f}",
            f"Median  KLD: {kl.median:10.6f}",
            "",
            "====== Token probability statistics ======",
            f"Same top p: {100 * kl.top1:6.3f} ± {100 * kl.top1_stderr:5.3f} %",
        ]
        return "\n".join(lines)


def read_text(text: str | os.PathLike[str]) -> str:
    """`text` itself, or the contents of the file when given a path object (UTF-8)."""
    if not isinstance(text, os.PathLike):
        return text
    path = Path(text)
    if not path.is_file():
        raise SourceError(f"text file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text ({exc})") from exc


def _check_vocab(backends: list[Backend], tokens: np.ndarray) -> None:
    if len(backends) == 2 and backends[0].n_vocab != backends[1].n_vocab:
        raise LlmqError(
            f"the model has {backends[0].n_vocab} logits per token and the reference "
            f"{backends[1].n_vocab}: KL divergence needs the same vocabulary"
        )
    top = int(tokens.max()) if len(tokens) else -1
    for b in backends:
        if top >= b.n_vocab:
            raise LlmqError(f"token id {top} is outside the {b.name} model's vocabulary of {b.n_vocab}")


def evaluate(
    model: str | os.PathLike[str],
    text: str | os.PathLike[str],
    *,
    ref: str | os.PathLike[str] | None = None,
    backend: str = "auto",
    ref_backend: str = "auto",
    n_chunks: int | None = None,
    n_ctx: int = 512,
    n_threads: int | None = None,
    progress: bool = True,
    exact_activations: bool = False,
) -> EvalResult:
    """Perplexity of `model` on `text` with llama-perplexity's protocol, optionally against `ref`.

    With `ref`, both models run in lockstep on the same chunks and every scored position also
    gives KL(ref || model) and whether both rank the same token first, as llama-perplexity's
    `--kl-divergence` reports.

    Args:
        model: a GGUF file, or a Hugging Face checkpoint directory or hub id.
        text: the evaluation text, or a path object (`pathlib.Path`) of a UTF-8 file.
        ref: reference model (same kinds as `model`), e.g. the F16 GGUF or the HF checkpoint.
        backend: "auto" (torch for a checkpoint, llama.cpp for a GGUF), "torch", "llama.cpp"
            or "numpy" (a GGUF through llmq's reference kernels).
        ref_backend: the same choice for `ref`.
        n_chunks: chunks to evaluate at most; None = all that fit.
        n_ctx: tokens per chunk (llama-perplexity's `-c`).
        n_threads: CPU threads for llama.cpp and torch; None = their defaults.
        progress: show a progress bar with the running PPL (and KL).
        exact_activations: numpy backend: multiply with float32 activations instead of rounding them
            to llama.cpp's 8-bit (Q8_0/Q8_1) or f16 activation types first.

    Returns:
        An `EvalResult`; `.report()` formats it, `.to_dict()` gives JSON-ready figures.

    Raises:
        LlmqError: bad backend, chunk settings, or models whose vocabularies differ.
        SourceError: a model or the text file is missing or unreadable.

    Example:
        >>> res = evaluate("smol.Q8_0.gguf", Path("wiki.test.raw"), ref="smol.F16.gguf", n_chunks=40)
        >>> res.ppl, res.kl.mean, res.kl.top1
    """
    start = time.perf_counter()
    check_chunking(n_ctx, n_chunks, what="evaluate")
    body = read_text(text)
    kind = resolve_backend(model, backend, option="backend")
    ref_kind = None if ref is None else resolve_backend(ref, ref_backend, option="ref_backend")
    opened: list[Backend] = []
    try:
        opened.append(
            open_backend(model, kind, n_ctx=n_ctx, n_threads=n_threads, exact_activations=exact_activations)
        )
        if ref is not None:
            opened.append(
                open_backend(
                    ref,
                    ref_kind or "auto",
                    n_ctx=n_ctx,
                    n_threads=n_threads,
                    option="ref_backend",
                    exact_activations=exact_activations,
                )
            )
        # One token stream for all: llama.cpp's tokenizer of a GGUF when there is one.
        tokenizer = opened[1] if ref is not None and not is_gguf(model) and is_gguf(ref) else opened[0]
        tokens = tokenizer.tokenize(body)
        chunks = count_chunks(len(tokens), n_ctx, n_chunks, what="evaluate")
        _check_vocab(opened, tokens[: chunks * n_ctx])
        results, kls = score_chunks(
            opened,
            tokens,
            n_ctx=n_ctx,
            n_chunks=chunks,
            add_bos=tokenizer.add_bos,
            bos_id=tokenizer.bos_id,
            ref=None if ref is None else 1,
            progress=progress,
            desc=f"eval {Path(str(model)).name}",
        )
    finally:
        for b in opened:
            b.close()
    return EvalResult(
        model=str(model),
        backend=kind,
        perplexity=results[0],
        text_tokens=len(tokens),
        ref=None if ref is None else str(ref),
        ref_backend=ref_kind,
        ref_perplexity=results[1] if ref is not None else None,
        kl=kls[0],
        seconds=time.perf_counter() - start,
    )
