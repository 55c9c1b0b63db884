"""Calibration data: token windows for activation-aware search, from the package, a file, the hub, or the model.

Sources (``--calib``): ``builtin`` (the default: a small multi-domain text shipped with llmq, written
for it — prose, dialogue, code, math, structured data, a dozen languages — so every machine calibrates
offline in seconds); a path to plain text or JSONL (a ``text`` field per line); ``hub:<owner/name>[/file]``
(a dataset file fetched with `huggingface_hub`); ``self`` (text sampled from the FP model, seeded).
Samples are ``n_samples`` windows of ``seqlen`` tokens drawn at seeded random offsets from the
tokenized corpus (AutoAWQ's 128 x 512 by default; ``builtin`` gives at most the distinct windows its
text holds).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import LlmqError, SourceError
from .precision import DTYPES

BUILTIN = "builtin"
DEFAULT_SOURCE = BUILTIN
# What `--calib hub:` fetches when only a dataset is named: AWQ's Pile validation sample.
DEFAULT_HUB_FILES = {"mit-han-lab/pile-val-backup": "val.jsonl.zst"}


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration tokens come from and how many.

    Attributes:
        source: ``builtin``, a file path, ``hub:<dataset>[/file]`` or ``self``.
        n_samples: number of token windows (``builtin``: at most the distinct windows its text holds).
        seqlen: tokens per window.
        batch_size: windows per forward pass (bounds activation memory).
        seed: seed of the window offsets (and of ``self`` sampling).
        forward_dtype: precision of the decoder layers' products while the windows flow through
            them: ``float32``, ``bfloat16`` (autocast; the statistics are still summed in float32),
            or ``auto`` (``bfloat16`` where the device computes it natively). float32 is the default:
            bfloat16 forwards cost 0.2% perplexity on the plain SmolLM2 reference (BENCHMARKS.md,
            "Scale, stop 19").
    """

    source: str
    n_samples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    seed: int = 0
    forward_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.forward_dtype not in DTYPES:
            raise LlmqError(
                f"calibration forward_dtype {self.forward_dtype!r}: choose one of {', '.join(DTYPES)}"
            )
        for name in ("n_samples", "seqlen", "batch_size"):
            if getattr(self, name) <= 0:
                raise LlmqError(
                    f"calibration {name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    """Documents of a calibration file: JSONL (``text`` field, optionally .zst) or plain text (one document)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: calibration file not found")
    raw = path.read_bytes()
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError as e:
            raise LlmqError(f"{path}: reading .zst needs `pip install zstandard`") from e
        raw = zstandard.ZstdDecompressor().stream_reader(raw).read()
    text = raw.decode("utf-8", errors="replace")
    if ".jsonl" in path.suffixes:
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError) as e:
                    raise SourceError(f"{path}:{i}: not a JSON object with a 'text' field") from e
        return docs
    return [text]


def builtin_texts() -> list[str]:
    """The documents of the ``builtin`` calibration text (``llmq/data/calibration/*.txt``, in name order)."""
    from importlib.resources import files

    folder = files("llmq.data") / "calibration"
    return [
        f.read_text(encoding="utf-8")
        for f in sorted(folder.iterdir(), key=lambda f: f.name)
        if f.name.endswith(".txt")
    ]


def _hub_file(spec: str) -> Path:
    from huggingface_hub import hf_hub_download

    parts = spec.split("/")
    if len(parts) < 2:
        raise LlmqError(f"calibration source hub:{spec}: expected hub:<owner>/<dataset>[/<file>]")
    repo = "/".join(parts[:2])
    file = "/".join(parts[2:]) or DEFAULT_HUB_FILES.get(repo)
    if not file:
        raise LlmqError(f"calibration source hub:{spec}: name the file inside the dataset, hub:{repo}/<file>")
    try:
        return Path(hf_hub_download(repo, file, repo_type="dataset"))
    except Exception as e:
        raise SourceError(f"calibration source hub:{spec}: could not fetch ({type(e).__name__}: {e})") from e


def windows(tokens: np.ndarray, cfg: CalibConfig) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens at seeded random offsets (without replacement when possible)."""
    span = len(tokens) - cfg.seqlen
    if span < 0:
        raise LlmqError(f"calibration text has {len(tokens)} tokens, fewer than seqlen={cfg.seqlen}")
    rng = np.random.default_rng(cfg.seed)
    n_distinct = span // cfg.seqlen + 1
    if cfg.n_samples <= n_distinct:  # non-overlapping windows at random slots
        starts = rng.choice(n_distinct, cfg.n_samples, replace=False) * cfg.seqlen
    else:
        starts = rng.integers(0, span + 1, cfg.n_samples)
    return torch.from_numpy(np.stack([tokens[s : s + cfg.seqlen] for s in starts]).astype(np.int64))


def calibration_tokens(cfg: CalibConfig, tokenizer: Any, *, generate: Any = None) -> torch.Tensor:
    """Token windows ``(n_samples, seqlen)`` for ``cfg``.

    Args:
        cfg: the calibration settings.
        tokenizer: a transformers tokenizer of the model.
        generate: for ``self``: a function ``(cfg) -> (n_samples, seqlen)`` int64 tensor of token ids
            sampled from the FP model (`sample_from_model`).

    Returns:
        An int64 tensor of token ids.
    """
    if cfg.source == "self":
        if generate is None:
            raise LlmqError("calibration source self needs the model to sample from")
        tokens = generate(cfg)
        assert tuple(tokens.shape) == (cfg.n_samples, cfg.seqlen), tuple(tokens.shape)
        return tokens
    if cfg.source == BUILTIN:
        texts = builtin_texts()
    else:
        hub = cfg.source.startswith("hub:")
        texts = read_texts(_hub_file(cfg.source[4:]) if hub else cfg.source)
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for doc in texts:  # documents joined by EOS, as a model sees separate texts
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None and len(texts) > 1:
            ids.append(eos)
    if cfg.source == BUILTIN:  # a small text: its distinct windows, not overlapping copies of them
        cfg = replace(cfg, n_samples=max(1, min(cfg.n_samples, len(ids) // cfg.seqlen)))
    return windows(np.asarray(ids, dtype=np.int64), cfg)


def sample_from_model(
    model_dir: str | os.PathLike[str], cfg: CalibConfig, *, progress: bool = True, device: str = "cpu"
) -> torch.Tensor:
    """``cfg.n_samples`` windows of ``cfg.seqlen`` tokens sampled from the FP model itself (calibration source ``self``).

    Each window starts at the BOS token (EOS if the model has none) and is sampled at temperature 1
    with the full distribution, seeded by ``cfg.seed``, in batches, on ``device`` (a GPU samples other
    tokens than the CPU from the same seed). This is the one step that loads the whole model (in
    float32); for large models prefer a calibration file.

    Returns:
        int64 ``(n_samples, seqlen)``; the first token of each window is the start token.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise LlmqError(f"{model_dir}: the tokenizer has neither BOS nor EOS to start sampling from")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    batch = min(cfg.n_samples, 32)
    out = torch.empty(cfg.n_samples, cfg.seqlen, dtype=torch.int64)
    bar = tqdm(total=cfg.n_samples * cfg.seqlen, desc="calib self", unit="tok", disable=not progress)
    with torch.no_grad():
        for b0 in range(0, cfg.n_samples, batch):
            n = min(batch, cfg.n_samples - b0)
            ids = torch.full((n, 1), start, dtype=torch.int64, device=device)
            out[b0 : b0 + n, 0] = start
            past, cur = None, ids
            for t in range(
                1, cfg.seqlen
            ):  # a plain sampling loop: seeded independently of transformers' generate
                res = model(input_ids=cur, cache=past, use_cache=True)
                past = res.cache
                probs = torch.softmax(res.logits[:, -1].float(), dim=-1)
                cur = torch.multinomial(probs, 1, generator=gen)
                out[b0 : b0 + n, t] = cur[:, 0].cpu()
            bar.update(n * cfg.seqlen)
    bar.close()
    del model
    return out


def batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(tokens), batch_size):
        yield tokens[i : i + batch_size]


@dataclass
class Calibration:
    """What an activation-aware search runs on: the token windows and how they were obtained."""

    config: CalibConfig
    tokens: torch.Tensor
    seconds: float = 0.0

    @property
    def description(self) -> str:
        n, seqlen = self.tokens.shape
        return f"{self.config.source} ({n} x {seqlen} tokens)"


def prepare_calibration(
    model_dir: Path, calib: CalibConfig | torch.Tensor | None, *, progress: bool = True, device: str = "cpu"
) -> Calibration:
    """Token windows from a `CalibConfig` (default ``self``), or a caller's own ``(n, seqlen)`` tensor."""
    t0 = time.perf_counter()
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or calib.dtype not in (torch.int64, torch.int32):
            raise LlmqError(
                f"calibration tokens must be an integer (n_samples, seqlen) tensor, got {calib.dtype} {tuple(calib.shape)}"
            )
        return Calibration(CalibConfig("tensor", calib.shape[0], calib.shape[1]), calib.long())
    cfg = calib or CalibConfig(DEFAULT_SOURCE)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = calibration_tokens(
        cfg, tokenizer, generate=lambda c: sample_from_model(model_dir, c, progress=progress, device=device)
    )
    return Calibration(cfg, tokens, time.perf_counter() - t0)
