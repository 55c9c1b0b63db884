"""End-to-end conversion of tiny random Llama checkpoints: layout, types, grouping, streaming, metadata."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants
from safetensors import safe_open
from tiny_models import make_tiny_llama

import llmq
from llmq.codecs import REGISTRY, GroupCodec
from llmq.mixes import MIXES
from llmq.stream import LayerStream


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k).float().numpy()
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the rotary permutation: llama.cpp layout -> HF layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    r = GGUFReader(path)
    return {
        t.name: (
            t.tensor_type.name,
            quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape))),
        )
        for t in r.tensors
    }


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_type_writes_a_gguf_holding_the_weights(tiny: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"tiny-{name}.gguf"
    result = llmq.convert(tiny, out, llmq.QuantConfig(method="rtn", quant=name), progress=False)
    assert result.path == out and out.is_file() and (tmp_path / f"tiny-{name}.md").is_file()
    assert not list(tmp_path.glob(".*partial")), "temporary file left behind"
    tensors = read(out)
    hf = hf_weights(tiny)
    # tied embeddings: no output tensor; 2 layers x 9 tensors + embedding + final norm
    assert "output.weight" not in tensors and len(tensors) == 2 * 9 + 2
    planned = {p.name: p.codec for p in result.plans}
    for i in range(2):
        for hf_name, gguf_name in [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("mlp.down_proj", "ffn_down"),
        ]:
            typ, w = tensors[f"blk.{i}.{gguf_name}.weight"]
            # K-quants need rows of 256: the tiny model's rows of 128 take llama-quantize's fallback
            assert typ == planned[f"blk.{i}.{gguf_name}.weight"]
            # Q2_K and Q6_K name llama.cpp's mixes: their per-tensor rules are tested in test_mixes.py
            assert typ == name or (name.endswith("_K") and gguf_name != "ffn_down") or name in MIXES
            codec = REGISTRY[typ]
            if gguf_name in ("attn_q", "attn_k"):
                w = unpermute(w, 4 if gguf_name == "attn_q" else 2)
            ref = hf[f"model.layers.{i}.{hf_name}.weight"]
            if codec.is_float:  # bf16 sources are exact in F32/BF16; F16 rounds small values (subnormals)
                tol = 0 if name != "F16" else 6e-8 + np.abs(ref).max() * 2.0**-11
            else:  # half a step of the format (a full step for K-quants' quantized sub-block scales)
                tol = np.abs(ref).max() / 2 ** (codec.bits - (2 if typ.endswith("_K") else 1))
            assert np.abs(w - ref).max() <= tol, f"{name} {gguf_name}"
        typ, norm = tensors[f"blk.{i}.attn_norm.weight"]
        assert typ == "F32"
        np.testing.assert_array_equal(norm, hf[f"model.layers.{i}.input_layernorm.weight"])
    embed_type = tensors["token_embd.weight"][0]
    assert embed_type == (name if codec.is_float else "Q8_0")


def test_group_wise_storage_shares_scales_across_blocks(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "g128.gguf"
    llmq.convert(
        tiny, out, llmq.QuantConfig(method="rtn", bits=4, group_size=128), progress=False, write_card=False
    )
    r = GGUFReader(out)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight")
    assert t.tensor_type.name == "Q4_1"
    blocks = np.asarray(t.data).reshape(-1, 4, REGISTRY["Q4_1"].type_size)  # 4 blocks of 32 per group
    assert (blocks[:, :, :4] == blocks[:, :1, :4]).all(), "a group's blocks must carry one d and m"
    # and they are exactly the group-wise RTN of the source row
    w = hf_weights(Path(tiny))["model.layers.0.mlp.up_proj.weight"]
    expected = REGISTRY["Q4_1"].encode_grouped(w, 128)
    assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected)


def test_sym_per_channel(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "chan.gguf"
    result = llmq.convert(
        tiny, out, llmq.QuantConfig(method="rtn", bits=4, group_size=-1, sym=True), progress=False
    )
    assert {p.codec for p in result.plans if p.role == "linear"} == {"Q4_0"}
    t = next(t for t in GGUFReader(out).tensors if t.name == "blk.1.attn_output.weight")
    d = np.asarray(t.data).reshape(128, -1, 18)[:, :, :2]
    assert (d == d[:, :1]).all(), "one scale per output row"


def test_default_output_name_and_summary(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = llmq.convert(
        tiny, config=llmq.QuantConfig(method="rtn", bits=4, group_size=64, sym=True), progress=False
    )
    assert result.path == Path("tiny-llama-Q4_0-g64.gguf")
    assert "bits/weight" in result.summary() and "tiny-llama-Q4_0-g64.gguf" in result.summary()


def test_metadata(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    llmq.convert(tiny, out, llmq.QuantConfig(method="rtn", quant="Q5_1"), progress=False)
    f = GGUFReader(out).fields
    v = {k: f[k].contents() for k in f if not k.startswith("tokenizer.ggml.") or k.endswith(("model", "pre"))}
    assert v["general.architecture"] == "llama"
    assert v["general.file_type"] == 9  # MOSTLY_Q5_1
    assert v["general.quantization_version"] == 2
    assert v["general.quantized_by"] == "llmq"
    assert v["llama.block_count"] == 2 and v["llama.embedding_length"] == 128
    assert v["llama.attention.head_count"] == 4 and v["llama.attention.head_count_kv"] == 2
    assert v["llama.feed_forward_length"] == 256 and v["llama.rope.dimension_count"] == 32
    assert v["tokenizer.ggml.model"] == "gpt2"


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    model = make_tiny_llama(tmp_path / "l3", rope_scaling=scaling)
    out = tmp_path / "l3.gguf"
    llmq.convert(model, out, llmq.QuantConfig(method="rtn", quant="Q8_0"), progress=False)
    typ, freqs = read(out)["rope_freqs.weight"]
    assert typ == "F32" and freqs.shape == (16,)
    assert freqs[0] == 1.0 and freqs[-1] == 8.0  # short wavelengths kept, long ones stretched


def test_only_one_layer_resident_with_sharded_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_tiny_llama(tmp_path / "sharded", n_layers=4, max_shard_size="100KB")
    assert len(list(model.glob("*.safetensors"))) > 4, "fixture should be sharded"
    live: list[tuple[int, weakref.ref]] = []
    reads: list[str] = []
    original_load = LayerStream.load
    original_get = llmq.Checkpoint.get

    def load(self: LayerStream, i: int) -> torch.nn.Module:
        gc.collect()
        resident = {j for j, ref in live if ref() is not None}
        assert resident <= set(), f"layers {resident} still resident when loading layer {i}"
        layer = original_load(self, i)
        live.extend((i, weakref.ref(p)) for p in layer.parameters())
        return layer

    def get(self: llmq.Checkpoint, name: str) -> torch.Tensor:
        reads.append(name)
        return original_get(self, name)

    monkeypatch.setattr(LayerStream, "load", load)
    monkeypatch.setattr(llmq.Checkpoint, "get", get)
    llmq.convert(model, tmp_path / "s.gguf", llmq.QuantConfig(method="rtn", quant="Q4_0"), progress=False)
    # layers were read strictly one after another: never a tensor of layer j after layer j+1 began
    order = [int(n.split(".")[2]) for n in reads if n.startswith("model.layers.")]
    assert order == sorted(order) and set(order) == {0, 1, 2, 3}
    gc.collect()
    assert all(ref() is None for _, ref in live)


def test_group_larger_than_row_remainder_is_ragged(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "ragged", hidden=96, heads=3, kv_heads=1, intermediate=160)
    result = llmq.convert(
        model, tmp_path / "r.gguf", llmq.QuantConfig(method="rtn", bits=5, group_size=64), progress=False
    )
    plans = {p.name: p for p in result.plans}
    assert plans["blk.0.attn_q.weight"].codec == "Q5_1" and "last group" in plans["blk.0.attn_q.weight"].note
    t = next(t for t in GGUFReader(result.path).tensors if t.name == "blk.0.ffn_down.weight")
    blocks = np.asarray(t.data).reshape(96, 5, 24)  # rows of 160 = groups of 64 + 64 + 32
    assert (blocks[:, 0, :4] == blocks[:, 1, :4]).all() and (blocks[:, 2, :4] == blocks[:, 3, :4]).all()


def test_group_codecs_registry_covers_gguf_legacy_types() -> None:
    assert {n for n, c in REGISTRY.items() if issubclass(c, GroupCodec)} >= {
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
    }


def test_hub_id_resolves_from_the_offline_cache(tmp_path: Path) -> None:
    """`llmq convert owner/name` goes through huggingface_hub, honouring HF_HOME and HF_HUB_OFFLINE."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-llama"
    snap = repo / "snapshots" / ("0123456789abcdef" * 2 + "01234567")
    make_tiny_llama(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "llmq", "convert", "--method", "rtn", *args, "-q"]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    done = cli("acme/tiny-llama", "--quant", "Q8_0")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "tiny-llama-Q8_0.gguf"
    assert out.is_file() and "base_model: acme/tiny-llama" in out.with_suffix(".md").read_text()
    missing = cli("acme/absent", "--quant", "Q8_0")
    assert missing.returncode == 2 and "acme/absent" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    (tmp_path / "models").mkdir()  # a missing local folder is said to be one, not only a hub failure
    local = cli("models/NoSuchModel", "--quant", "Q8_0")
    assert local.returncode == 2 and "models/NoSuchModel: no such local directory" in local.stderr
    assert len(local.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("tie", [True, False])
def test_llama_cpp_logits_equal_transformers_logits(tmp_path: Path, tie: bool) -> None:
    """The strongest layout check: llama.cpp running our F32 file computes what transformers computes."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(tmp_path / "m", tie=tie, heads=4, kv_heads=2)
    out = tmp_path / "m.gguf"
    llmq.convert(model, out, llmq.QuantConfig(method="rtn", quant="F32"), progress=False)
    names = {t.name for t in GGUFReader(out).tensors}
    assert ("output.weight" in names) != tie
    tokens = [1, 40, 77, 120, 5, 230, 64, 99, 150, 11]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].numpy()
    llm = Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1, n_threads_batch=1)
    llm.eval(tokens)
    got = np.asarray(llm.scores[: len(tokens)])
    np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max())


def test_k_quant_rows_that_do_not_split_fall_back_like_llama_quantize(tmp_path: Path) -> None:
    """Rows of 128 are not whole 256-value super-blocks: Q4_K -> Q5_0, Q6_K -> Q8_0 (llama_tensor_get_type)."""
    tiny = make_tiny_llama(tmp_path / "m", hidden=128, intermediate=256)
    for quant, fallback in (("Q4_K", "Q5_0"), ("Q6_K", "Q8_0")):
        res = llmq.convert(
            tiny, tmp_path / f"{quant}.gguf", llmq.QuantConfig(method="rtn", quant=quant), progress=False
        )
        types = {p.name: p.codec for p in res.plans}
        assert types["blk.0.attn_q.weight"] == fallback  # rows of 128
        assert types["blk.0.ffn_down.weight"] == quant  # rows of 256
        reader = GGUFReader(res.path)
        stored = {t.name: t.tensor_type.name for t in reader.tensors}
        assert stored["blk.0.attn_q.weight"] == fallback and stored["blk.0.ffn_down.weight"] == quant
