"""Tiny random-weight Hugging Face checkpoints built inside the tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "Numbers like 12345 and 678 appear in text, as do symbols: (a + b) * c = d; "
) * 20


def make_tokenizer(out: Path, vocab_size: int = 320) -> int:
    """Train a small byte-level BPE tokenizer into ``out``; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    return tok.get_vocab_size()


# model_type -> (config class, causal-LM class, config settings that give the family its structure)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases are the class's own
    # heads of 32 where hidden / heads is 64 or 32: a head_dim of its own, as in the real Qwen3s
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    # llama.cpp scales queries by 1/sqrt(head_dim) for these sizes: query_pre_attn_scalar says so;
    # Gemmas always tie their embeddings (llama.cpp's gemma archs have no output tensor)
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 8, "tie_word_embeddings": True},
    ),
    # fused qkv_proj and gate_up_proj; no sliding window (llama.cpp then attends to everything)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None, "pad_token_id": 0}),
    # mixtures of experts: 8 experts (llama-quantize's 8-expert rules apply), 2 per token
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 256,
            "head_dim": 64,
            "norm_topk_prob": True,
        },
    ),
    # six layers: five local (rope base 10000), one global, llama.cpp's fixed pattern
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 64,
            "query_pre_attn_scalar": 64,
            "sliding_window": 8,
            "num_hidden_layers": 6,
            "tie_word_embeddings": True,
        },
    ),
}


def make_tiny(
    family: str,
    out: Path,
    *,
    n_layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    tie: bool = True,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    rope_scaling: dict | None = None,
    outliers: float = 0.0,
) -> Path:
    """Save a random checkpoint of ``family`` (`FAMILIES`; safetensors, optionally sharded) with a tokenizer.

    ``outliers`` > 0 multiplies a few channels of every norm by that factor, giving the activation
    outlier channels real LLMs have (what AWQ's scales are for).
    """
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    vocab = make_tokenizer(out)
    kwargs = {} if rope_scaling is None else {"rope_scaling": rope_scaling}
    settings = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **extra,
        **kwargs,
    }
    config = getattr(transformers, config_cls)(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # norms away from 1 so their handling is visible in outputs
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
        if outliers:
            channels = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))[
                : max(1, hidden // 32)
            ]
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p[channels] *= outliers
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    return out


def make_tiny_llama(out: Path, **kwargs) -> Path:
    """`make_tiny` of a `LlamaForCausalLM`."""
    return make_tiny("llama", out, **kwargs)


def logit_kl(model_dir: Path, gguf_path: Path, tokens: torch.Tensor) -> float:
    """KL(FP checkpoint || GGUF run by llmq's numpy backend) of next-token distributions on ``tokens``."""
    from transformers import AutoModelForCausalLM

    from llmq.eval.numpy_backend import build_model

    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    q, _ = build_model(gguf_path, round_activations=False)
    with torch.no_grad():
        a = torch.log_softmax(fp(tokens).logits, -1)
        b = torch.log_softmax(q(tokens).logits, -1)
    return float((a.exp() * (a - b)).sum(-1).mean())  # KL(fp || quantized)


def convert_awq_pair(
    tmp_path: Path, option: str
) -> tuple[dict[bool, dict[str, object]], dict[bool, dict], dict]:
    """A tiny Llama converted to Q4_K_M by AWQ with the encoder option ``option`` off and on.

    Returns ``{on: llmq.awq words}``, ``{on: {tensor name: gguf tensor}}`` and the run with the
    option's search report.
    """
    import gguf

    import llmq
    from llmq.report import parse_awq_text

    model = make_tiny_llama(tmp_path / "m", hidden=256, intermediate=512, dtype=torch.float32, outliers=4.0)
    calib = llmq.CalibConfig("self", n_samples=4, seqlen=32, batch_size=2)
    words, tensors = {}, {}
    for on in (False, True):
        out = tmp_path / f"{option}{int(on)}.gguf"
        llmq.convert(
            model, out, llmq.QuantConfig(quant="Q4_K_M"), calib=calib, encoder=llmq.EncoderConfig(**{option: on}),
            progress=False, write_card=False,
        )  # fmt: skip
        reader = gguf.GGUFReader(out)
        words[on] = parse_awq_text(reader.fields["llmq.awq"].contents())
        tensors[on] = {t.name: t for t in reader.tensors}
    return words, tensors, json.loads(out.with_suffix(".search.json").read_text())
