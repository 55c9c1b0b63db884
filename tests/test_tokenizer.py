"""Tests of llmq.writers.tokenizer: GGUF tokenizer metadata as llama.cpp expects it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from llmq.errors import LlmqError, SourceError
from llmq.writers.tokenizer import PRE_TOKENIZERS, TokenizerSummary, add_tokenizer

# Split regexes as they appear in the published tokenizer.json files (written out independently of
# the module's table, so a typo there fails here).
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

PRE_CASES: dict[str, Any] = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    ),
    "qwen2": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    ),
}


def _write_gguf(model_dir: Path, out: Path) -> tuple[TokenizerSummary, dict[str, Any]]:
    """Write ``model_dir``'s tokenizer to a tensor-less GGUF and read its tokenizer fields back."""
    writer = gguf.GGUFWriter(out, "llama")
    summary = add_tokenizer(writer, model_dir)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return summary, _tokenizer_fields(out)


def _tokenizer_fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _tiny_bpe(model_dir: Path, pre_tokenizer: Any, *, config_vocab_size: int | None = None) -> None:
    """A few-token byte-level BPE checkpoint: tokenizer.json, tokenizer_config.json, maybe config.json."""
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab = {"a": 0, "b": 1, "ab": 2, "Ġ": 3, "1": 4, "2": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])  # id 6
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])  # id 7
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    if config_vocab_size is not None:
        (model_dir / "config.json").write_text(json.dumps({"vocab_size": config_vocab_size}))


def test_reference_tokenizer_splits_digits(reference_model_dir: Path) -> None:
    # make_reference_model restores SmolLM2's pre-tokenizer, which transformers' GGUF loader drops.
    tok = Tokenizer.from_file(str(reference_model_dir / "tokenizer.json"))
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("12345")] == list("12345")


def test_matches_original_gguf(reference_model_dir: Path, smollm2_gguf_path: Path, tmp_path: Path) -> None:
    summary, ours = _write_gguf(reference_model_dir, tmp_path / "tok.gguf")
    orig = _tokenizer_fields(smollm2_gguf_path)

    assert summary == TokenizerSummary(
        model="gpt2", pre="smollm", n_tokens=49152, n_merges=48900, has_chat_template=True
    )
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_space_prefix",
        "tokenizer.chat_template",
    ):
        assert ours[key] == orig[key], key
    # The one extra key: add_eos_token=False, written explicitly because the tokenizer appends no
    # EOS; the original omits it and llama.cpp's default for BPE is also false.
    assert set(ours) - set(orig) == {"tokenizer.ggml.add_eos_token"}
    assert ours["tokenizer.ggml.add_eos_token"] is False
    assert set(orig) - set(ours) == set()


@pytest.mark.parametrize("name", sorted(PRE_CASES))
def test_pre_tokenizer_table(name: str, tmp_path: Path) -> None:
    _tiny_bpe(tmp_path / "m", PRE_CASES[name]())
    summary, fields = _write_gguf(tmp_path / "m", tmp_path / "tok.gguf")
    assert summary.pre == name
    assert fields["tokenizer.ggml.pre"] == name
    assert fields["tokenizer.ggml.model"] == "gpt2"


def test_pre_cases_cover_table() -> None:
    assert {name for name, _ in PRE_TOKENIZERS} == set(PRE_CASES)


def test_unknown_pre_tokenizer_is_an_error(tmp_path: Path) -> None:
    """Never a guessed pre-tokenizer: llama.cpp would split text differently from transformers."""
    _tiny_bpe(tmp_path / "m", pre_tokenizers.Whitespace())
    with pytest.raises(SourceError, match=r"unknown pre_tokenizer .*Whitespace.*; llmq maps gpt-2, smollm"):
        _write_gguf(tmp_path / "m", tmp_path / "tok.gguf")


def test_bpe_token_types_merges_and_padding(tmp_path: Path) -> None:
    _tiny_bpe(tmp_path / "m", PRE_CASES["gpt-2"](), config_vocab_size=10)
    summary, fields = _write_gguf(tmp_path / "m", tmp_path / "tok.gguf")
    T = gguf.TokenType
    assert fields["tokenizer.ggml.tokens"] == [
        "a",
        "b",
        "ab",
        "Ġ",
        "1",
        "2",
        "<|endoftext|>",
        "<tool>",
        "[PAD8]",
        "[PAD9]",
    ]
    assert (
        fields["tokenizer.ggml.token_type"] == [T.NORMAL] * 6 + [T.CONTROL, T.USER_DEFINED] + [T.UNUSED] * 2
    )
    assert fields["tokenizer.ggml.merges"] == ["a b"]
    assert fields["tokenizer.ggml.eos_token_id"] == 6
    assert fields["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.ggml.scores" not in fields  # llama.cpp's BPE ignores scores
    assert summary.n_tokens == 10 and summary.n_merges == 1


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match=str(tmp_path)) as err:
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path)
    assert "tokenizer.json" in str(err.value) and "tokenizer.model" in str(err.value)


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(SourceError, match="WordLevel"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path)


def _spm_config(model_dir: Path) -> None:
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))


def test_llama_hf_byte_fallback_tokenizer_json(tmp_path: Path) -> None:
    # A Llama-2-style tokenizer.json (SentencePiece BPE with byte fallback) and no tokenizer.model.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece in ("▁", "a", "b", "▁a", "ab", "▁ab"):
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b")]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.save(str(tmp_path / "tokenizer.json"))
    _spm_config(tmp_path)

    summary, fields = _write_gguf(tmp_path, tmp_path / "tok.gguf")
    T = gguf.TokenType
    assert summary.model == fields["tokenizer.ggml.model"] == "llama"
    assert summary.pre is None and "tokenizer.ggml.pre" not in fields
    assert fields["tokenizer.ggml.token_type"][:4] == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE]
    scores = dict(zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"], strict=True))
    # llama.cpp merges the highest-scoring pair first: scores must follow the merge order.
    assert scores["▁a"] > scores["ab"] > scores["▁ab"]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.add_space_prefix"] is True


def test_sentencepiece_model(tmp_path: Path) -> None:
    import sentencepiece as spm

    text = ["hello world, this is a tiny sentencepiece test"] * 20 + ["the quick brown fox 12345"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    _spm_config(tmp_path)

    summary, fields = _write_gguf(tmp_path, tmp_path / "tok.gguf")
    T = gguf.TokenType
    assert summary.model == "llama" and summary.n_tokens == 300 and summary.n_merges == 0
    assert fields["tokenizer.ggml.tokens"][:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert fields["tokenizer.ggml.token_type"][:4] == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE]
    assert len(fields["tokenizer.ggml.scores"]) == 300
    # No tokenizer.json: the special ids come from tokenizer_config.json's token names.
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.unknown_token_id"] == 0
    assert fields["tokenizer.ggml.add_space_prefix"] is True


def test_sentencepiece_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"")
    monkeypatch.setattr(gguf.vocab, "SentencePieceProcessor", None)
    with pytest.raises(LlmqError, match="pip install sentencepiece"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path)


# Text llama.cpp must split as SentencePiece does: spaces, tabs and newlines, code, accents, CJK,
# emoji (byte fallback), digits, and control-token names written as plain text.
SPM_TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\nnew lines",
    "def is_prime(n):\n    return all(n % d for d in range(2, n))",
    "Größe, naïve café — «quotes» 日本語のテキスト 😀 emoji",
    "1234567890 3.14159 x^2+y^2",
    "[INST] What? [/INST] <s>literal</s> tags",
]


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_real_mistral_sentencepiece_tokenizes_in_llama_cpp_as_sentencepiece(
    version: str, mistral_tokenizers: dict[str, Path], tmp_path: Path
) -> None:
    """A Mistral checkpoint with its real ``tokenizer.model``: llmq's GGUF holds SentencePiece's pieces,
    scores and types, and llama.cpp tokenizes text to the ids SentencePiece gives."""
    import shutil

    import sentencepiece as spm
    import torch
    import transformers
    from llama_cpp import Llama

    import llmq

    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizers[version]))
    n = sp.get_piece_size()
    model = tmp_path / "mistral"
    cfg = transformers.MistralConfig(
        vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.MistralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model)
    shutil.copy(mistral_tokenizers[version], model / "tokenizer.model")
    _spm_config(model)
    out = llmq.convert(model, tmp_path / "m.gguf", llmq.QuantConfig(quant="F32"), progress=False).path

    fields = _tokenizer_fields(out)
    T = gguf.TokenType
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(n)])
    kinds = [
        T.UNKNOWN
        if sp.is_unknown(i)
        else T.CONTROL
        if sp.is_control(i)
        else T.BYTE
        if sp.is_byte(i)
        else T.NORMAL
        for i in range(n)
    ]
    assert fields["tokenizer.ggml.token_type"] == kinds
    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [1, *sp.encode(text)], text
