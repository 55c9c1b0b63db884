"""Every registered architecture, against llama.cpp and transformers (tiny random checkpoints).

For each family in `llmq.arch.registered()` (and `tiny_models.FAMILIES`, which must cover them):
- llama.cpp running llmq's F32 file computes transformers' logits;
- llama.cpp's own quantizer, given llmq's F16 file, writes llmq's round-to-nearest Q4_0 and Q4_K_M
  (tensor types and bytes);
- the default AWQ recipe runs through the family's layers and lowers llama.cpp's KL to the FP model
  against round to nearest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, make_tiny

import llmq
from llmq.arch import registered
from llmq.eval.llamacpp import quantize_with_llama_cpp
from llmq.mixes import MIXES

TOKENS = [1, 40, 77, 120, 5, 230, 64, 99, 150, 11, 3, 200, 31, 17, 250, 8]


def test_every_architecture_has_a_tiny_model() -> None:
    assert sorted(FAMILIES) == sorted(registered())


def _hf_logits(model: Path, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


def _llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, n_threads_batch=1)
    llm.eval(tokens)
    out = np.asarray(llm.scores[: len(tokens)]).copy()
    llm.close()
    return out


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    a = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    b = torch.log_softmax(torch.from_numpy(got).double(), -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


def _tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.array(t.data).view(np.uint8).reshape(-1)) for t in r.tensors}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny untied checkpoint of each family, rows of 256 (every K type applies), 4 heads of 64."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    # float16: the F16 file then holds exactly the checkpoint's values
    model = make_tiny(name, root / "m", hidden=256, intermediate=512, heads=4, kv_heads=2, tie=False,
                      dtype=torch.float16)  # fmt: skip
    return name, model


def test_llama_cpp_logits_equal_transformers_logits(family: tuple[str, Path], tmp_path: Path) -> None:
    name, model = family
    out = tmp_path / "f32.gguf"
    llmq.convert(model, out, llmq.QuantConfig(method="rtn", quant="F32"), progress=False, write_card=False)
    reader = gguf.GGUFReader(out)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == registered()[name].gguf_arch_name
    if name == "qwen3":  # head_dim 32, hidden / heads 64: llama.cpp must be told the head sizes
        assert int(reader.fields["qwen3.attention.key_length"].parts[-1][0]) == 32
    ref, got = _hf_logits(model, TOKENS), _llama_cpp_logits(out, TOKENS)
    # ggml's GELU (the Gemmas) reads a float16 table: ~1e-3 per activation, compounding over layers
    rel = 5e-3 if name.startswith("gemma") else 2e-3
    np.testing.assert_allclose(got, ref, atol=rel * np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_K_M"])
def test_llama_quantize_of_our_f16_is_our_rtn(family: tuple[str, Path], tmp_path: Path, quant: str) -> None:
    _, model = family
    kw = {"progress": False, "write_card": False}
    f16 = llmq.convert(model, tmp_path / "f16.gguf", llmq.QuantConfig(quant="F16"), **kw)
    ours = llmq.convert(model, tmp_path / "q.gguf", llmq.QuantConfig(quant=quant, method="rtn"), **kw)
    ref = _tensors(quantize_with_llama_cpp(f16.path, tmp_path / "ref.gguf", quant))
    mine = _tensors(ours.path)
    assert sorted(mine) == sorted(ref)
    for tensor, (typ, data) in mine.items():
        if quant == "Q4_0" and not tensor.startswith("blk."):
            continue  # llmq's plain types keep embeddings and output at Q8_0; the mix follows llama.cpp
        assert typ == ref[tensor][0], (tensor, typ, ref[tensor][0])
        assert np.array_equal(data, ref[tensor][1]), f"{tensor} ({typ}): bytes differ from llama.cpp"


def test_awq_beats_rtn_in_llama_cpp(family: tuple[str, Path], tmp_path: Path) -> None:
    name, _ = family
    # no grouped-query attention, so the v -> o group (and a Qwen2 v bias) is scaled too; outlier channels
    model = make_tiny(name, tmp_path / "m", hidden=256, intermediate=512, heads=4, kv_heads=4, tie=False,
                      dtype=torch.float32, outliers=8.0)  # fmt: skip
    calib = llmq.CalibConfig("builtin", n_samples=8, seqlen=64)
    kw = {"progress": False, "write_card": False}
    awq = llmq.convert(model, tmp_path / "awq.gguf", llmq.QuantConfig(quant="Q4_0"), calib=calib, **kw)
    rtn = llmq.convert(model, tmp_path / "rtn.gguf", llmq.QuantConfig(quant="Q4_0", method="rtn"), **kw)
    arch = registered()[name]
    groups = [g for r in awq.reports for g in r.details["scales"] if "alpha" in g]
    assert len(groups) == len(arch.scale_groups) * len(awq.reports)  # every group searched
    assert any(g["alpha"] for g in groups)  # some scaled
    if arch.experts is not None:  # the MoE block: routed tokens per expert, its norm group searched
        for r in awq.reports:
            moe = r.details["experts"]
            assert sum(moe["tokens"]) == 8 * 64 * 2 and len(moe["tokens"]) == 8  # top-2 of 8 experts
            assert moe["norm"]["loss_after"] <= moe["norm"]["loss_before"]
    tokens = list(range(3, 250, 5))
    ref = _hf_logits(model, tokens)
    kl_awq, kl_rtn = (_kl(ref, _llama_cpp_logits(p, tokens)) for p in (awq.path, rtn.path))
    assert kl_awq < 0.9 * kl_rtn, (name, kl_awq, kl_rtn)


def test_calibration_forwards_are_transformers(family: tuple[str, Path]) -> None:
    """The layer-by-layer calibration flow (embedding scale, masks with sliding windows, rotary per
    layer type) gives transformers' hidden states: what the searches see is what the model computes."""
    from transformers import AutoModelForCausalLM

    from llmq.activations import CalibrationFlow
    from llmq.arch import get_arch
    from llmq.source import Checkpoint
    from llmq.stream import LayerStream

    _, model = family
    tokens = torch.tensor([TOKENS * 4])  # 64 positions: past the tiny Gemmas' sliding window of 8
    ckpt = Checkpoint(model)
    arch = get_arch(ckpt.config)
    flow = CalibrationFlow(tokens, ckpt.get(arch.embed), ckpt.config, arch, batch_size=1)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        want = hf(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(flow.store.read(0), want[0], rtol=1e-5, atol=1e-5)
    for i, layer in LayerStream(ckpt, arch):
        flow.advance(layer)
        if i + 1 < len(want) - 1:  # the last entry is after the final norm
            torch.testing.assert_close(
                flow.store.read(0), want[i + 1], rtol=1e-4, atol=1e-4 * float(want[i + 1].abs().max())
            )
    flow.close()


def test_every_scale_group_folds_without_changing_the_layer(family: tuple[str, Path]) -> None:
    """The architecture data is right: each group's ``prev`` (a norm, a linear, or rows of a fused
    one) feeds exactly its linears, so folding any scale into it leaves the layer's output as it was."""
    from llmq.activations import LayerRunner
    from llmq.arch import get_arch
    from llmq.awq import _is_norm, fold_scales, skips_scaling
    from llmq.source import Checkpoint
    from llmq.stream import LayerStream

    _, model = family
    ckpt = Checkpoint(model)
    arch = get_arch(ckpt.config)
    runner = LayerRunner(ckpt.config, arch)
    layer = LayerStream(ckpt, arch).load(0)
    x = torch.randn(2, 12, ckpt.config.hidden_size, generator=torch.Generator().manual_seed(1))
    before = runner(layer, x)
    gen = torch.Generator().manual_seed(2)
    folded = 0
    for group in arch.scale_groups:
        prev, linears = layer.get_submodule(group.prev), [layer.get_submodule(n) for n in group.linears]
        rows = group.prev_rows(layer) if group.prev_rows is not None else None
        if skips_scaling(group, prev, linears, rows):
            continue
        s = 0.5 + torch.rand(linears[0].weight.shape[1], generator=gen)
        fold_scales(prev, linears, s, norm_offset=arch.norm_offset if _is_norm(prev) else 0.0, rows=rows)
        folded += 1
    assert folded == len(arch.scale_groups) - 1  # v -> o is skipped under grouped-query attention (2 of 4)
    if arch.experts is not None:  # the MoE block's folds: norm -> router, gates, ups; each up -> down
        from llmq.moe import fold_block, fold_expert

        fold_block(
            layer, arch.experts, 0.5 + torch.rand(ckpt.config.hidden_size, generator=gen), arch.norm_offset
        )
        n, inter = layer.mlp.experts.down_proj.shape[0], layer.mlp.experts.down_proj.shape[2]
        for e in range(n):
            fold_expert(layer, arch.experts, e, 0.5 + torch.rand(inter, generator=gen))
    torch.testing.assert_close(runner(layer, x), before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


def test_compressed_tensors_output_loads_in_transformers(family: tuple[str, Path], tmp_path: Path) -> None:
    """The safetensors output of every dense family loads in transformers with llmq's values; a MoE
    family is refused before any work (GGUF only)."""
    from test_formats import _client_logits, _dense_logits

    from llmq.errors import FormatError

    name, _ = family
    # bf16, as the capture of llmq's values assumes (`test_formats.Capture`)
    model = make_tiny(name, tmp_path / "m", hidden=256, intermediate=512, heads=4, kv_heads=2, tie=False)
    if registered()[name].experts is not None:
        with pytest.raises(FormatError, match="mixture-of-experts layers.*--format gguf"):
            llmq.convert(
                model,
                tmp_path / "ct",
                llmq.QuantConfig(bits=4, group_size=64),
                formats=["compressed-tensors"],
            )
        assert not (tmp_path / "ct").exists()
        return
    load = "m = AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()"
    got, values, ids = _client_logits(model, tmp_path, "compressed-tensors", 0, load)
    torch.testing.assert_close(got, _dense_logits(model, values, ids), rtol=1e-3, atol=2e-3)


@pytest.fixture(scope="module")
def mixtral_f16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny 8-expert Mixtral (llama-quantize's 8-expert rules apply) and its F16 GGUF."""
    root = tmp_path_factory.mktemp("mixtral8")
    model = make_tiny("mixtral", root / "m", hidden=256, intermediate=512, tie=False, dtype=torch.float16)
    f16 = llmq.convert(
        model, root / "f16.gguf", llmq.QuantConfig(quant="F16"), progress=False, write_card=False
    )
    return model, f16.path


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_eight_expert_mixes_are_llama_quantizes(
    mixtral_f16: tuple[Path, Path], tmp_path: Path, mix: str
) -> None:
    model, f16 = mixtral_f16
    ours = llmq.convert(model, tmp_path / "q.gguf", llmq.QuantConfig(quant=mix, method="rtn"), progress=False,
                        write_card=False)  # fmt: skip
    ref, mine = _tensors(quantize_with_llama_cpp(f16, tmp_path / "ref.gguf", mix)), _tensors(ours.path)
    assert {n: t for n, (t, _) in mine.items()} == {n: t for n, (t, _) in ref.items()}
    assert all(np.array_equal(data, ref[n][1]) for n, (_, data) in mine.items())


@pytest.mark.parametrize("name", sorted(n for n, a in registered().items() if a.experts is not None))
def test_stacked_experts_are_encoded_with_error_feedback(name: str, tmp_path: Path) -> None:
    """The K recipe's error feedback reaches every expert: each is re-rounded against its own routed
    tokens' second moment (4096 calibration tokens: every expert of the top-2 of 8 sees enough)."""
    from llmq.encoding import EncoderConfig

    model = make_tiny(name, tmp_path / "m", hidden=256, intermediate=512, tie=False, dtype=torch.float32)
    calib = llmq.CalibConfig("builtin", n_samples=32, seqlen=128)
    kw = {"progress": False, "write_card": False, "calib": calib}
    fed = llmq.convert(model, tmp_path / "fb.gguf", llmq.QuantConfig(quant="Q4_K_M"), **kw)
    plain = llmq.convert(model, tmp_path / "no.gguf", llmq.QuantConfig(quant="Q4_K_M"),
                         encoder=EncoderConfig(refine=True, feedback=False), **kw)  # fmt: skip
    a, b = _tensors(fed.path), _tensors(plain.path)
    experts = [n for n in a if "_exps." in n]
    assert len(experts) == 3 * len(fed.reports)
    for n in experts:  # every expert of every stacked tensor re-rounded
        x, y = (t[n][1].reshape(8, -1) for t in (a, b))
        assert all(not np.array_equal(x[e], y[e]) for e in range(8)), n


def test_phi3_longrope_factors_reach_llama_cpp(tmp_path: Path) -> None:
    """The 128k Phi-3s (and Phi-3.5-mini, Phi-4-mini): rope_factors_long/short written, and llama.cpp
    computes transformers' logits within the original context (where both use the short factors)."""
    gen = np.random.default_rng(5)
    rope = {
        "rope_type": "longrope",
        "long_factor": (1 + 3 * gen.random(32)).tolist(),
        "short_factor": (1 + 0.5 * gen.random(32)).tolist(),
    }
    model = make_tiny("phi3", tmp_path / "m", hidden=256, intermediate=512, heads=4, kv_heads=2, tie=False,
                      dtype=torch.float16, rope_scaling=rope)  # fmt: skip
    cfg = json.loads((model / "config.json").read_text())
    # max_position_embeddings 512: a 2x extension; llama.cpp pads the test's context of 64 to 256,
    # still within the original context, so both sides take the short factors
    cfg["original_max_position_embeddings"] = 256
    cfg["rope_parameters"]["original_max_position_embeddings"] = 256
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "f32.gguf"
    llmq.convert(model, out, llmq.QuantConfig(method="rtn", quant="F32"), progress=False, write_card=False)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"], np.float32(rope["short_factor"]))
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"], np.float32(rope["long_factor"]))
    want = math.sqrt(1 + math.log(2) / math.log(256))
    assert float(reader.fields["phi3.rope.scaling.attn_factor"].parts[-1][0]) == pytest.approx(want)
    ref, got = _hf_logits(model, TOKENS), _llama_cpp_logits(out, TOKENS)
    np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max())
