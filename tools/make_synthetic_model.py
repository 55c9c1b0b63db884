"""Build a random Llama checkpoint with a real model's layer shapes, sharded like a hub checkpoint.

For measuring memory and time at sizes no real model here has: the weights are random (normal,
std 0.02; norms 1), so quality figures from them mean nothing. Each tensor is generated from its
own seed and written shard by shard, so building needs memory for one shard, not the model. The
tokenizer (and its vocabulary size) is copied from ``--tokenizer`` (default: the SmolLM2 reference
built by ``tools/make_reference_model.py``).

Presets (``--preset``):
  ``1b``:  16 layers of Llama-3.2-1B (hidden 2048, MLP 8192, 32/8 heads), tied embedding, ~1.0 B
           weights with SmolLM2's vocabulary, 500 MB shards (issue: safetensors vs GGUF peak RSS).
  ``8b``:  2 layers of Llama-3.1-8B (4096, 14336, 32/8 heads), untied output.
  ``70b``: 1 layer of Llama-3.1-70B (8192, 28672, 64/8 heads), untied output.

Usage::

    python tools/make_synthetic_model.py OUT_DIR --preset 1b [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS: dict[str, dict[str, int | bool]] = {
    "1b": {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8, "tie": True},
    "8b": {"hidden": 4096, "intermediate": 14336, "layers": 2, "heads": 32, "kv_heads": 8, "tie": False},
    "70b": {"hidden": 8192, "intermediate": 28672, "layers": 1, "heads": 64, "kv_heads": 8, "tie": False},
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def tensor_shapes(p: dict, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama checkpoint's tensors, in file order."""
    h, i, hd = p["hidden"], p["intermediate"], p["hidden"] // p["heads"]
    kv = p["kv_heads"] * hd
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for n in range(p["layers"]):
        pre = f"model.layers.{n}."
        shapes += [
            (pre + "input_layernorm.weight", (h,)),
            (pre + "self_attn.q_proj.weight", (h, h)),
            (pre + "self_attn.k_proj.weight", (kv, h)),
            (pre + "self_attn.v_proj.weight", (kv, h)),
            (pre + "self_attn.o_proj.weight", (h, h)),
            (pre + "post_attention_layernorm.weight", (h,)),
            (pre + "mlp.gate_proj.weight", (i, h)),
            (pre + "mlp.up_proj.weight", (i, h)),
            (pre + "mlp.down_proj.weight", (h, i)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not p["tie"]:
        shapes.append(("lm_head.weight", (vocab, h)))
    return shapes


def make_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def build(out: Path, preset: str, tokenizer: Path, shard_bytes: int) -> Path:
    p = PRESETS[preset]
    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        weight_map: dict[str, int] = {}
        written: list[str] = []

        def flush() -> None:
            idx = len(written) + 1
            name = f"model-{idx:05d}.safetensors"
            save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
            written.append(name)
            shards[-1] = {}

        total = 0
        for seed, (name, shape) in enumerate(tensor_shapes(p, vocab)):
            t = make_tensor(name, shape, seed)
            if size and size + t.numel() * 2 > shard_bytes:
                flush()
                size = 0
            shards[-1][name] = t
            weight_map[name] = len(written)
            size += t.numel() * 2
            total += t.numel() * 2
        flush()
        # rename the shards to the hub's -of-N names now that N is known
        n = len(written)
        names = {}
        for k, old in enumerate(written, 1):
            names[k - 1] = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.rename(tmp / old, tmp / names[k - 1])
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t: names[i] for t, i in weight_map.items()},
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": p["hidden"],
            "intermediate_size": p["intermediate"],
            "num_hidden_layers": p["layers"],
            "num_attention_heads": p["heads"],
            "num_key_value_heads": p["kv_heads"],
            "head_dim": p["hidden"] // p["heads"],
            "vocab_size": vocab,
            "tie_word_embeddings": p["tie"],
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 8192,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for f in TOKENIZER_FILES:
            if (tokenizer / f).is_file():
                shutil.copy2(tokenizer / f, tmp / f)
        (tmp / "README.md").write_text(
            f"Random weights with {preset}-shaped Llama layers (tools/make_synthetic_model.py); "
            "for memory and speed measurements only.\n"
        )
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main() -> int:
    cache = Path(os.environ.get("LLMQ_TEST_CACHE") or Path.home() / ".cache" / "llmq-tests")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--tokenizer", type=Path, default=cache / "SmolLM2-135M-Instruct")
    ap.add_argument("--shard-mb", type=int, default=500, help="shard size in MB")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    args = ap.parse_args()
    if not (args.tokenizer / "tokenizer.json").is_file():
        raise SystemExit(
            f"{args.tokenizer}: no tokenizer.json; build the reference with tools/make_reference_model.py"
        )
    if args.out.exists() and not args.force:
        print(f"{args.out} exists (pass --force to rebuild)")
        return 0
    print(build(args.out, args.preset, args.tokenizer, args.shard_mb * 10**6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
