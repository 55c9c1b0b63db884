"""Tokenizer metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``) for Llama-family checkpoints.

Two tokenizer families are supported, as llama.cpp names them:

* ``gpt2``: byte-level BPE from ``tokenizer.json`` (SmolLM2, Llama 3, Qwen2). llama.cpp re-implements
  the pre-tokenizer split by name, so ``tokenizer.ggml.pre`` is looked up in `PRE_TOKENIZERS`.
* ``llama``: SentencePiece, from ``tokenizer.model`` or, failing that, from a ``tokenizer.json``
  holding a byte-fallback BPE model (Llama 2, Mistral, TinyLlama).

Token texts come from gguf-py's vocab classes; special-token ids, merges, ``add_*_token`` flags and
the chat template from its `gguf.SpecialVocab`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

from ..errors import LlmqError, SourceError

log = logging.getLogger(__name__)

TokenType = gguf.TokenType

# Split regexes of tokenizer.json files, verbatim (JSON-decoded).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 differs from Llama 3 only in splitting numbers into single digits (\p{N}, not \p{N}{1,3}).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Building blocks of PRE_TOKENIZERS: the keys of one tokenizer.json pre-tokenizer step that decide the split.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_BYTE_LEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
_DIGITS = {"type": "Digits", "individual_digits": True}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# tokenizer.json pre-tokenizer -> llama.cpp pre name. Each entry is the sequence of pre-tokenizer
# steps (a lone pre-tokenizer is a one-step sequence); a step matches when every key listed here has
# that value in the file, so keys that do not change the split (trim_offsets) are left out.
PRE_TOKENIZERS: tuple[tuple[str, tuple[dict[str, Any], ...]], ...] = (
    ("gpt-2", (_BYTE_LEVEL,)),
    ("smollm", (_DIGITS, _BYTE_LEVEL)),
    ("llama-bpe", (_split(LLAMA3_REGEX), _BYTE_LEVEL_NO_REGEX)),
    ("qwen2", (_split(QWEN2_REGEX), _BYTE_LEVEL_NO_REGEX)),
)

# Values the `tokenizers` library assumes for keys that older tokenizer.json files leave out.
_STEP_DEFAULTS: dict[str, dict[str, Any]] = {
    "ByteLevel": {"add_prefix_space": True, "use_regex": True},
    "Digits": {"individual_digits": False},
    "Split": {"invert": False},
}


@dataclass(frozen=True)
class TokenizerSummary:
    """What `add_tokenizer` wrote.

    Attributes:
        model: ``tokenizer.ggml.model`` (``"gpt2"`` or ``"llama"``).
        pre: ``tokenizer.ggml.pre``, or None where it is not written (SentencePiece ignores it).
        n_tokens: length of the token list, padding included.
        n_merges: number of BPE merges written (0 for SentencePiece).
        has_chat_template: whether ``tokenizer.chat_template`` was written.
    """

    model: str
    pre: str | None
    n_tokens: int
    n_merges: int
    has_chat_template: bool


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data


def _step_matches(step: Any, pattern: dict[str, Any]) -> bool:
    if not isinstance(step, dict):
        return False
    full = {**_STEP_DEFAULTS.get(step.get("type", ""), {}), **step}
    return all(full.get(k) == v for k, v in pattern.items())


def pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """The llama.cpp pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` entry.

    Args:
        pre_tokenizer: the ``pre_tokenizer`` value of a tokenizer.json (None when absent).

    Returns:
        The name from `PRE_TOKENIZERS`.

    Raises:
        SourceError: none matches (naming the pre-tokenizer and the ones llmq maps).
    """
    steps: list[Any] = []
    if isinstance(pre_tokenizer, dict):
        is_seq = pre_tokenizer.get("type") == "Sequence"
        steps = list(pre_tokenizer.get("pretokenizers") or []) if is_seq else [pre_tokenizer]
    for name, pattern in PRE_TOKENIZERS:
        if len(steps) == len(pattern) and all(map(_step_matches, steps, pattern)):
            return name
    # llama.cpp re-implements each split by name: a guessed name would tokenize text differently
    # from transformers without a word (convert_hf_to_gguf.py refuses an unknown one too)
    raise SourceError(
        f"tokenizer.json: unknown pre_tokenizer {json.dumps(pre_tokenizer)[:300]}; llmq maps "
        f"{', '.join(name for name, _ in PRE_TOKENIZERS)} to llama.cpp's pre-tokenizers"
    )


def _added_tokens(model_dir: Path, tokenizer_json: dict[str, Any] | None) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) of the tokenizer's added tokens (tokenizer.json, else tokenizer_config.json)."""
    out: dict[int, tuple[str, bool]] = {}
    for tok in (tokenizer_json or {}).get("added_tokens") or []:
        out.setdefault(int(tok["id"]), (str(tok["content"]), bool(tok.get("special", False))))
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        decoder = _read_json(config_file).get("added_tokens_decoder") or {}
        for tid, tok in decoder.items():
            out.setdefault(int(tid), (str(tok["content"]), bool(tok.get("special", False))))
    return out


def _config_vocab_size(model_dir: Path) -> int | None:
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    config = _read_json(path)
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _merge_scores(tokenizer_json: dict[str, Any]) -> dict[str, float]:
    """Token -> -(rank of the merge that forms it), for a byte-fallback BPE tokenizer.json.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result has the highest score,
    so scores must order merges as the BPE merge list does (gguf's LlamaHfVocab writes a constant).
    """
    scores: dict[str, float] = {}
    for rank, merge in enumerate(tokenizer_json["model"].get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, float(-rank))
    return scores


def _load_vocab(model_dir: Path) -> tuple[str, Any, dict[str, Any] | None]:
    """Pick the vocab class for ``model_dir``: (tokenizer.ggml.model, vocab, parsed tokenizer.json)."""
    tok_json_path, spm_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    tokenizer_json = _read_json(tok_json_path) if tok_json_path.is_file() else None
    if tokenizer_json is None and not spm_path.is_file():
        raise SourceError(
            f"{model_dir}: no tokenizer found (expected tokenizer.json, or tokenizer.model for SentencePiece)"
        )
    kind = "spm"
    if tokenizer_json is not None:
        model = tokenizer_json.get("model") or {}
        if model.get("type") != "BPE":
            raise SourceError(
                f"{tok_json_path}: unsupported tokenizer model type {model.get('type')!r} (expected BPE)"
            )
        kind = "spm" if model.get("byte_fallback") else "bpe"
        if kind == "spm" and not spm_path.is_file():
            kind = "hf"
    try:
        if kind == "bpe":
            return "gpt2", BpeVocab(model_dir), tokenizer_json
        if kind == "hf":
            return "llama", LlamaHfVocab(model_dir), tokenizer_json
        # gguf.vocab imports sentencepiece optionally and leaves this None when it is missing.
        if gguf.vocab.SentencePieceProcessor is None:
            raise LlmqError(
                f"{spm_path}: reading a SentencePiece tokenizer needs `pip install sentencepiece`"
            )
        return "llama", SentencePieceVocab(model_dir), tokenizer_json
    except (OSError, ValueError, TypeError, KeyError) as e:
        if isinstance(e, LlmqError):
            raise
        raise SourceError(f"{model_dir}: cannot read the tokenizer ({type(e).__name__}: {e})") from e


def _token_table(
    model_dir: Path, model: str, vocab: Any, tokenizer_json: dict[str, Any] | None
) -> tuple[list[str], list[float], list[int]]:
    """Token texts, scores and llama.cpp token types, padded to the model's vocab size."""
    texts: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, ttype in vocab.all_tokens():
        texts.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        scores.append(float(score))
        types.append(int(ttype))

    if isinstance(vocab, LlamaHfVocab) and tokenizer_json is not None:
        merge_scores = _merge_scores(tokenizer_json)
        unk = tokenizer_json["model"].get("unk_token")
        for i, text in enumerate(texts):
            scores[i] = merge_scores.get(text, 0.0)
            # SentencePiece marks <unk> UNKNOWN, not CONTROL; keep the two llama routes alike.
            if text == unk:
                types[i] = TokenType.UNKNOWN

    # Added tokens: special ones are CONTROL (never produced from plain text unless parse_special),
    # the others USER_DEFINED (matched verbatim before pre-tokenization). Their text is the raw
    # content, not the byte-level form the BPE vocab may also hold.
    added = _added_tokens(model_dir, tokenizer_json)
    n_config = _config_vocab_size(model_dir) or 0
    n = max([len(texts), *(tid + 1 for tid in added), n_config])
    if n_config and n > n_config:
        log.warning("%s: tokenizer has %d tokens but config.json vocab_size is %d", model_dir, n, n_config)
    pad = n - len(texts)
    texts += [""] * pad
    scores += [-1000.0] * pad
    types += [0] * pad  # 0: not typed yet (TokenType starts at 1)
    for tid, (content, special) in added.items():
        if model == "llama" and tid < vocab.vocab_size_base and types[tid] != TokenType.NORMAL:
            continue  # SentencePiece already typed it (<unk>, <s>, byte tokens)
        texts[tid], types[tid] = content, int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    # Ids no tokenizer file names (the embedding is padded past the vocab): unused placeholders.
    for i in range(n):
        if types[i] == 0:
            texts[i], types[i] = f"[PAD{i}]", int(TokenType.UNUSED)
    return texts, scores, types


def _encode_flags(tokenizer_file: Path, special: SpecialVocab) -> dict[str, bool]:
    """add_bos/add_eos as the tokenizer itself behaves: encode a word and look at both ends."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode("a", add_special_tokens=True).ids
    flags: dict[str, bool] = {}
    for typ, pos in (("bos", 0), ("eos", -1)):
        tid = special.special_token_ids.get(typ)
        if tid is not None:
            flags[typ] = bool(ids) and ids[pos] == tid
    return flags


def _add_space_prefix(vocab: Any, tokenizer_file: Path) -> bool:
    """Whether a SentencePiece tokenizer prepends "▁" to the text (llama.cpp's add_space_prefix)."""
    if isinstance(vocab, SentencePieceVocab):
        pieces = vocab.sentencepiece_tokenizer.EncodeAsPieces("a")
    else:
        from tokenizers import Tokenizer

        pieces = Tokenizer.from_file(str(tokenizer_file)).encode("a", add_special_tokens=False).tokens
    return bool(pieces) and pieces[0].startswith("\u2581")


def _fill_special_ids(model_dir: Path, special: SpecialVocab, texts: list[str]) -> None:
    """Special ids SpecialVocab missed: it resolves tokenizer_config.json names only through
    tokenizer.json's added tokens, which a tokenizer.model-only checkpoint does not have."""
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return
    config = _read_json(config_file)
    for typ in special.special_token_types:
        entry = config.get(f"{typ}_token")
        name = entry.get("content") if isinstance(entry, dict) else entry
        if typ not in special.special_token_ids and isinstance(name, str) and name in texts:
            special.special_token_ids[typ] = texts.index(name)


def _chat_template_file(model_dir: Path) -> str | None:
    # transformers 5 saves the template beside tokenizer_config.json; SpecialVocab only looks there
    # when tokenizer_config.json exists.
    jinja, js = model_dir / "chat_template.jinja", model_dir / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if js.is_file():
        template = _read_json(js).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path) -> TokenizerSummary:
    """Write the tokenizer of the checkpoint in ``model_dir`` as GGUF metadata.

    Writes ``tokenizer.ggml.{model, pre, tokens, token_type, scores, merges, *_token_id,
    add_bos_token, add_eos_token, add_space_prefix}`` and ``tokenizer.chat_template`` as llama.cpp
    reads them; ``pre`` only for BPE, ``scores`` only for SentencePiece, ``merges`` only for BPE.

    Args:
        writer: the GGUF writer, before its key/values are written out.
        model_dir: the checkpoint directory (tokenizer.json and/or tokenizer.model,
            tokenizer_config.json, config.json, chat_template.jinja).

    Returns:
        A `TokenizerSummary` of what was written.

    Raises:
        SourceError: no tokenizer files in ``model_dir``, or they cannot be read.
        LlmqError: a SentencePiece tokenizer but the ``sentencepiece`` package is missing.
    """
    model_dir = Path(model_dir)
    model, vocab, tokenizer_json = _load_vocab(model_dir)
    texts, scores, types = _token_table(model_dir, model, vocab, tokenizer_json)
    tokenizer_file = model_dir / "tokenizer.json"

    pre: str | None = None
    writer.add_tokenizer_model(model)
    if model == "gpt2":
        assert tokenizer_json is not None  # BPE is only ever read from tokenizer.json
        pre = pre_tokenizer_name(tokenizer_json.get("pre_tokenizer"))
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(texts)
    if model == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)

    special = SpecialVocab(model_dir, load_merges=model == "gpt2", n_vocab=len(texts))
    if tokenizer_json is not None:
        # Neither tokenizer_config.json nor a TemplateProcessing said: ask the tokenizer itself.
        for typ, value in _encode_flags(tokenizer_file, special).items():
            special.add_special_token.setdefault(typ, value)
    _fill_special_ids(model_dir, special, texts)
    if special.chat_template is None:
        special.chat_template = _chat_template_file(model_dir)
    special.add_to_gguf(writer, quiet=True)

    if model == "gpt2":
        # Byte-level BPE encodes spaces itself; only a pre-tokenizer with add_prefix_space would add
        # one, and those are not in PRE_TOKENIZERS.
        writer.add_add_space_prefix(False)
    else:
        writer.add_add_space_prefix(_add_space_prefix(vocab, tokenizer_file))

    return TokenizerSummary(
        model=model,
        pre=pre,
        n_tokens=len(texts),
        n_merges=len(special.merges),
        has_chat_template=special.chat_template is not None,
    )
