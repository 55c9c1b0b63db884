"""llama-perplexity's chunking and scoring, shared by every evaluation backend.

A backend (`Backend`) only turns one chunk of token ids into logits; this module owns the rest of
the protocol of llama.cpp's examples/perplexity/perplexity.cpp: chunk boundaries, the BOS
substitution, which positions are scored, the NLL statistics and, when a reference model runs in
lockstep, the KL-divergence statistics of its `--kl-divergence` mode.

Example:
    >>> scores, kls = score_chunks([model, ref], tokens, n_ctx=512, n_chunks=40,
    ...                            add_bos=False, bos_id=None, ref=1)
    >>> scores[0].ppl, kls[0].mean
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from ..errors import LlmqError

LogitsCallback = Callable[[int, np.ndarray], None]
"""`on_logits(chunk_index, logits)`: logits of one chunk's scored positions, float32 (n_scored, n_vocab)."""


class Backend(Protocol):
    """One model behind the perplexity protocol.

    Attributes:
        name: backend name as the CLI spells it ("torch", "llama.cpp", "numpy").
        add_bos: whether the model's tokenizer prepends BOS (each chunk then starts with BOS).
        bos_id: the BOS token id, or None when the vocab has none.
        n_vocab: rows of the output layer (logits per position).
    """

    name: str
    add_bos: bool
    bos_id: int | None
    n_vocab: int

    def tokenize(self, text: str) -> np.ndarray:
        """The whole text as token ids (BOS first when `add_bos`), as llama-perplexity tokenizes it."""
        ...

    def logits(self, chunk: np.ndarray) -> np.ndarray:
        """Logits at positions `n // 2 .. n - 2` of `chunk` (n tokens) decoded from an empty context.

        Returns a float32 array (n - 1 - n // 2, n_vocab); it may be a view that the next call
        overwrites.
        """
        ...

    def close(self) -> None:
        """Free the model."""
        ...


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on a text, as llama-perplexity reports it.

    Attributes:
        ppl: exp(mean NLL) over every scored token ("Final estimate: PPL").
        ppl_stderr: the "+/-" llama-perplexity prints: `nll_stderr * ppl`.
        nll_mean: mean negative log-likelihood (nats/token).
        nll_stderr: standard error of `nll_mean`.
        chunk_ppl: running PPL after each chunk (the `[1]x,[2]y,...` line).
        token_logprobs: log p(token) of every scored token, chunk after chunk, float64.
        n_tokens_scored: `n_chunks * (n_ctx - 1 - n_ctx // 2)`.
        n_chunks: chunks evaluated.
        n_ctx: tokens per chunk.
        add_bos: whether each chunk started with BOS (the vocab's add_bos flag).
        seconds: wall time of the chunk evaluations (load and tokenization excluded).
    """

    ppl: float
    ppl_stderr: float
    nll_mean: float
    nll_stderr: float
    chunk_ppl: tuple[float, ...]
    token_logprobs: np.ndarray = field(repr=False, compare=False)
    n_tokens_scored: int
    n_chunks: int
    n_ctx: int
    add_bos: bool
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Evaluated (not only scored) tokens per second."""
        return self.n_chunks * self.n_ctx / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class KLStats:
    """KL divergence of a model's next-token distributions from a reference's, per scored token.

    What llama-perplexity's `--kl-divergence` prints, computed exactly in float64 (llama.cpp stores
    the reference's log-probs quantized to 16 bits).

    Attributes:
        mean: mean of KL(ref || model) = sum p_ref * (log p_ref - log p_model), nats.
        stderr: standard error of `mean`.
        median: median KL.
        p99: 99th percentile of KL (numpy's linear interpolation).
        max: largest KL.
        top1: fraction of positions where both models rank the same token first ("Same top p").
        top1_stderr: binomial standard error of `top1`.
        n_tokens: scored positions.
        token_kl: the KL of every scored position, chunk after chunk, float64.
    """

    mean: float
    stderr: float
    median: float
    p99: float
    max: float
    top1: float
    top1_stderr: float
    n_tokens: int
    token_kl: np.ndarray = field(repr=False, compare=False)


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] per row, max-shifted float32 with float64 sums.

    Mirrors perplexity.cpp's `log_softmax`: max in float, sum of exp accumulated in double.
    """
    peak = logits.max(axis=1)
    sum_exp = np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64)
    picked = logits[np.arange(len(targets)), targets].astype(np.float64)
    return picked - peak.astype(np.float64) - np.log(sum_exp)


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def token_kl(model_logits: np.ndarray, ref_logits: np.ndarray) -> np.ndarray:
    """KL(ref || model) per row of two (n, n_vocab) logit arrays, in float64.

    Mirrors perplexity.cpp's `kl_divergence` per position: sum_i p_ref_i * (log p_ref_i - log p_i).
    """
    ref = _log_softmax64(ref_logits)
    diff = ref - _log_softmax64(model_logits)
    return (np.exp(ref) * diff).sum(axis=1)


def check_chunking(n_ctx: int, n_chunks: int | None, *, what: str = "perplexity") -> None:
    """Refuse chunk settings llama-perplexity refuses too."""
    if n_ctx < 4:
        raise LlmqError(f"{what}: n_ctx={n_ctx} is too small (at least 4 tokens per chunk)")
    if n_chunks is not None and n_chunks < 1:
        raise LlmqError(f"{what}: n_chunks={n_chunks} must be at least 1")


def count_chunks(n_tokens: int, n_ctx: int, n_chunks: int | None, *, what: str = "perplexity") -> int:
    """Chunks to evaluate: all whole chunks of the text, at most `n_chunks`."""
    if n_tokens < 2 * n_ctx:  # the same refusal as llama-perplexity
        raise LlmqError(f"{what}: the text has {n_tokens} tokens; n_ctx={n_ctx} needs at least {2 * n_ctx}")
    n_max = n_tokens // n_ctx
    return n_max if n_chunks is None else min(n_chunks, n_max)


def perplexity_result(
    logprobs: np.ndarray,
    running: Sequence[float],
    *,
    n_chunks: int,
    n_ctx: int,
    add_bos: bool,
    seconds: float,
) -> PerplexityResult:
    """NLL statistics of the scored tokens' log-probs, as perplexity.cpp prints them."""
    nll = -logprobs
    nll_mean = float(nll.mean())
    # perplexity.cpp: sqrt((E[x^2] - E[x]^2) / (count - 1)), printed times PPL.
    var = float((nll * nll).mean()) - nll_mean * nll_mean
    nll_stderr = math.sqrt(var / (len(nll) - 1)) if var > 0 and len(nll) > 1 else 0.0
    ppl = math.exp(nll_mean)
    return PerplexityResult(
        ppl=ppl,
        ppl_stderr=nll_stderr * ppl,
        nll_mean=nll_mean,
        nll_stderr=nll_stderr,
        chunk_ppl=tuple(running),
        token_logprobs=logprobs,
        n_tokens_scored=len(nll),
        n_chunks=n_chunks,
        n_ctx=n_ctx,
        add_bos=add_bos,
        seconds=seconds,
    )


def kl_stats(kl: np.ndarray, same_top: np.ndarray) -> KLStats:
    """Summary of per-token KL values and top-1 agreements (perplexity.cpp's final KL report)."""
    n = len(kl)
    mean = float(kl.mean())
    stderr = float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    top1 = float(same_top.mean())
    return KLStats(
        mean=mean,
        stderr=stderr,
        median=float(np.median(kl)),
        p99=float(np.percentile(kl, 99.0)),
        max=float(kl.max()),
        top1=top1,
        top1_stderr=math.sqrt(top1 * (1.0 - top1) / (n - 1)) if n > 1 else 0.0,
        n_tokens=n,
        token_kl=kl,
    )


def score_chunks(
    backends: Sequence[Backend],
    tokens: np.ndarray,
    *,
    n_ctx: int,
    n_chunks: int,
    add_bos: bool,
    bos_id: int | None,
    ref: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
    on_logits: LogitsCallback | None = None,
) -> tuple[list[PerplexityResult], list[KLStats | None]]:
    """Run llama-perplexity's protocol on one or more backends in lockstep over the same chunks.

    Mirrors `perplexity()` (and `kl_divergence()`) of perplexity.cpp: the token stream is cut into
    `n_chunks` non-overlapping chunks of `n_ctx` tokens; each chunk is decoded from an empty
    context with its first token replaced by BOS when `add_bos`; the logits at positions
    n_ctx/2 .. n_ctx-2 score the next token. Each chunk is decoded once per backend, so several
    models compared with one reference cost one reference run.

    Args:
        backends: the models.
        tokens: the whole tokenized text (int).
        n_ctx: tokens per chunk.
        n_chunks: chunks to evaluate (see `count_chunks`).
        add_bos: replace each chunk's first token by `bos_id`.
        bos_id: the BOS token id (used only when `add_bos`).
        ref: index of the reference among `backends`: every other backend also gets
            KL(reference || backend) and top-1 agreement per scored token. None = no KL.
        progress: show a tqdm bar with the first backend's running PPL (and KL).
        desc: the bar's label.
        on_logits: called with a float32 copy of the first backend's logits after each chunk.

    Returns:
        One `PerplexityResult` per backend (its `seconds` count only that backend's decoding), and
        one `KLStats` per backend against the reference (None for the reference itself, and for
        all when `ref` is None).

    Example:
        >>> results, kls = score_chunks([q8, q4, f16], tokens, n_ctx=512, n_chunks=40,
        ...                             add_bos=False, bos_id=None, ref=2)
        >>> kls[0].mean < kls[1].mean
        True
    """
    if ref is not None and not 0 <= ref < len(backends):
        raise ValueError(f"score_chunks: ref={ref} is not an index of the {len(backends)} backends")
    if add_bos and bos_id is None:
        raise LlmqError("the tokenizer adds BOS but the vocab names no BOS token")
    first = n_ctx // 2
    n_scored = n_ctx - 1 - first
    n_all = n_chunks * n_scored
    logprobs = [np.empty(n_all, dtype=np.float64) for _ in backends]
    running: list[list[float]] = [[] for _ in backends]
    nll_sums = [0.0] * len(backends)
    seconds = [0.0] * len(backends)
    compared = [] if ref is None else [b for b in range(len(backends)) if b != ref]
    kl_values = {b: np.empty(n_all, dtype=np.float64) for b in compared}
    same_top = {b: np.empty(n_all, dtype=bool) for b in compared}

    bar = tqdm(range(n_chunks), desc=desc, unit="chunk", disable=not progress)
    for k in bar:
        chunk = np.array(tokens[k * n_ctx : (k + 1) * n_ctx], dtype=np.int64)
        targets = chunk[first + 1 :].copy()
        if add_bos:  # only the decoded copy: the targets come from the untouched stream
            chunk[0] = bos_id
        rows = slice(k * n_scored, (k + 1) * n_scored)
        chunk_logits: list[np.ndarray] = []
        for b, backend in enumerate(backends):
            start = time.perf_counter()
            logits = backend.logits(chunk)  # may be a view: each backend decodes once per chunk
            seconds[b] += time.perf_counter() - start
            if logits.shape != (n_scored, backend.n_vocab):
                raise RuntimeError(
                    f"{backend.name} backend returned logits of shape {logits.shape}, "
                    f"expected {(n_scored, backend.n_vocab)}"
                )
            lp = token_logprobs(logits, targets)
            logprobs[b][rows] = lp
            nll_sums[b] -= float(lp.sum())
            running[b].append(math.exp(nll_sums[b] / ((k + 1) * n_scored)))
            if b == 0 and on_logits is not None:
                on_logits(k, np.array(logits, dtype=np.float32, copy=True))
            chunk_logits.append(logits)
        postfix = {"ppl": f"{running[0][-1]:.4f}"}
        if ref is not None:
            ref_logp = _log_softmax64(chunk_logits[ref])
            ref_p, ref_top = np.exp(ref_logp), chunk_logits[ref].argmax(axis=1)
            for b in compared:
                kl_values[b][rows] = (ref_p * (ref_logp - _log_softmax64(chunk_logits[b]))).sum(axis=1)
                same_top[b][rows] = chunk_logits[b].argmax(axis=1) == ref_top
            postfix["kl"] = f"{kl_values[compared[0]][: rows.stop].mean():.5f}" if compared else "0"
        bar.set_postfix(postfix)
    bar.close()

    results = [
        perplexity_result(
            logprobs[b], running[b], n_chunks=n_chunks, n_ctx=n_ctx, add_bos=add_bos, seconds=seconds[b]
        )
        for b in range(len(backends))
    ]
    kls = [kl_stats(kl_values[b], same_top[b]) if b in kl_values else None for b in range(len(backends))]
    return results, kls
