"""The AWQ search: exact Gram-trick losses, function-preserving folding, monotone search and clipping,
determinism, reports and metadata, and a quality gain over round-to-nearest on a model with outliers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import logit_kl, make_tiny_llama

import llmq
from llmq.activations import CalibrationFlow
from llmq.awq import AWQConfig, AWQSearch, fold_scales
from llmq.calib import CalibConfig
from llmq.clip import clip_search, group_bounds, output_error
from llmq.encoding import EncoderConfig, Target
from llmq.report import kv_bytes, parse_awq_text

SMALL_CALIB = CalibConfig("self", n_samples=8, seqlen=64, batch_size=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("awq") / "m", n_layers=2, kv_heads=4, dtype=torch.float32, outliers=8.0
    )


def _layer_and_flow(model_dir: Path, n: int = 4, seqlen: int = 32):
    ckpt = llmq.Checkpoint(model_dir)
    arch = llmq.get_arch(ckpt.config)
    tokens = torch.randint(3, ckpt.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(1))
    flow = CalibrationFlow(tokens, ckpt.get(arch.embed), ckpt.config, arch, batch_size=2)
    layer = llmq.LayerStream(ckpt, arch).load(0)
    return ckpt, arch, layer, flow


def _targets(
    layer: torch.nn.Module, arch: llmq.ArchSpec, codec: str = "Q4_0", group: int = 32, weighted: bool = True
) -> dict[str, Target]:
    enc = EncoderConfig(weighted=weighted)
    return {name: Target(codec, group, enc) for g in arch.scale_groups for name in g.linears}


def test_gram_loss_equals_the_output_error_over_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 64, generator=gen)
    e = torch.randn(16, 64, generator=gen)
    stats = llmq.activations.InputStats(64)
    stats.add(x[:200])
    stats.add(x[200:])
    direct = float(((x @ e.T) ** 2).sum(1).mean())
    assert output_error(e, stats.mean_gram) == pytest.approx(direct, rel=1e-4)
    np.testing.assert_allclose(stats.mean_sq, (x**2).mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(stats.mean_abs.numpy(), x.abs().mean(0).numpy(), rtol=1e-5)


def test_folding_scales_keeps_the_fp_layer_function(tiny: Path) -> None:
    ckpt, arch, layer, flow = _layer_and_flow(tiny)
    x = flow.store.read(0)
    before = flow.runner(layer, x)
    gen = torch.Generator().manual_seed(2)
    for group in arch.scale_groups:
        prev = layer.get_submodule(group.prev)
        linears = [layer.get_submodule(n) for n in group.linears]
        if group.needs_same_shape and prev.weight.shape[0] != linears[0].weight.shape[1]:
            continue
        s = torch.rand(linears[0].weight.shape[1], generator=gen) * 4 + 0.25
        fold_scales(prev, linears, s)
    after = flow.runner(layer, x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    flow.close()


@pytest.mark.parametrize(
    "codec,group,weighted", [("Q4_0", 32, True), ("Q4_1", 64, False), ("Q4_1", 32, True)]
)
def test_search_never_ends_above_the_unscaled_loss(
    tiny: Path, codec: str, group: int, weighted: bool
) -> None:
    ckpt, arch, layer, flow = _layer_and_flow(tiny)
    search = AWQSearch(AWQConfig(clip=False, n_grid=10))
    stats = flow.capture(layer, arch.capture_modules, write_outputs=False)
    grams = {k: v.mean_gram.clone() for k, v in stats.items()}
    orig = {n: layer.get_submodule(n).weight.detach().clone() for g in arch.scale_groups for n in g.linears}
    targets = _targets(layer, arch, codec, group, weighted)
    report = search.run(layer, 0, stats, targets, arch)
    searched = [g for g in report.details["scales"] if "loss_before" in g]
    assert searched, report.details
    for g in searched:
        assert g["loss_after"] <= g["loss_before"]
    # recompute independently: the stored (scaled, quantized) weights err less than unscaled RTN/weighted ones
    for info in searched:
        gram = grams[info["linears"][0]]
        imp = torch.diagonal(gram).numpy() if weighted else None
        before = after = 0.0
        for name in info["linears"]:
            w0 = orig[name]
            q0 = torch.from_numpy(targets[name].fake_quant(w0.numpy(), imp))
            before += output_error(w0 - q0, gram)
            # the stored weight is W0 * R, R = s on columns times any later row scale (v -> o):
            # decode it and divide R out to compare in the original coordinates
            ws = layer.get_submodule(name).weight.detach()
            ratio = ws / w0
            imp_s = None if imp is None else imp / ratio[0].numpy() ** 2
            q = torch.from_numpy(targets[name].fake_quant(ws.numpy(), imp_s)) / ratio
            after += output_error(w0 - q, gram)
        assert after <= before * (1 + 1e-4), (info, before, after)
    flow.close()


def test_clip_search_never_widens_a_range_and_never_raises_the_loss() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 96, generator=gen) * torch.linspace(0.2, 3, 96)
    gram = x.T @ x / 400
    w = torch.randn(24, 96, generator=gen) * 0.05
    w[3, 5] = 1.0  # an outlier worth clipping
    for codec, group in (("Q4_0", 32), ("Q4_1", 64), ("Q5_1", 32)):
        t = Target(codec, group)
        clipped, info = clip_search(w, t, gram, None, AWQConfig().clip_ratios)
        for a, b in group_bounds(96, group):
            assert (clipped[:, a:b].amax(1) <= w[:, a:b].amax(1) + 1e-7).all()
            assert (clipped[:, a:b].amin(1) >= w[:, a:b].amin(1) - 1e-7).all()
        assert info["loss_after"] <= info["loss_before"] * (1 + 1e-6)
        assert 0 < info["clipped_fraction"] <= 1, info
        err_before = output_error(w - torch.from_numpy(t.fake_quant(w.numpy(), None)), gram)
        err_after = output_error(w - torch.from_numpy(t.fake_quant(clipped.numpy(), None)), gram)
        assert err_after < err_before


def test_ragged_groups_follow_the_codec_split() -> None:
    assert group_bounds(576, 128) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    assert group_bounds(64, -1) == [(0, 64)]


def test_awq_is_deterministic_and_seeded(tiny: Path, tmp_path: Path) -> None:
    cfg = llmq.QuantConfig(quant="Q4_0")
    paths = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        calib = CalibConfig("self", n_samples=4, seqlen=32, batch_size=2, seed=seed)
        paths.append(llmq.convert(tiny, tmp_path / f"{name}.gguf", cfg, calib=calib, progress=False).path)
    data = [[np.asarray(t.data).tobytes() for t in gguf.GGUFReader(p).tensors] for p in paths]
    assert data[0] == data[1]
    assert data[0] != data[2]


def test_awq_report_metadata_and_card(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.gguf"
    res = llmq.convert(tiny, out, llmq.QuantConfig(quant="Q4_1"), calib=SMALL_CALIB, progress=False)
    report = json.loads(res.report_path.read_text())
    assert report["method"] == "awq" and len(report["layers"]) == 2
    assert report["calibration"] == {**report["calibration"], "source": "self", "samples": 8, "seqlen": 64}
    summary = report["summary"]
    fields = gguf.GGUFReader(out).fields
    assert not any(k.startswith("llmq.") and k != "llmq.awq" for k in fields)  # one string says it all
    awq = parse_awq_text(fields["llmq.awq"].contents())
    assert awq["calib"] == "self" and awq["samples"] == "8x64" and awq["seed"] == 0
    assert awq["scale"] == "duo" and awq["clip"] == "on" and awq["inputs"] == "quant"
    assert awq["alpha_mean"] == pytest.approx(summary["alpha_mean"], abs=1e-3)
    assert awq["clip_mean"] == pytest.approx(summary["clip_ratio_mean"], abs=1e-4)
    assert awq["loss_ratio"] == pytest.approx(summary["scale_loss_ratio"], abs=1e-4)
    assert awq["fallbacks"] == summary["scale_fallbacks"]
    card = res.card_path.read_text()
    assert "awq" in card and "self (8 x 64 tokens)" in card


def test_awq_provenance_is_smaller_than_llama_quantize_imatrix_keys(tiny: Path, tmp_path: Path) -> None:
    # llama-quantize --imatrix adds four keys naming the imatrix file and its dataset (the same
    # calibration file); llmq's one string must take fewer bytes even for a 1-character imatrix name
    # and a long seed, so at the same tensor types its file is never the larger.
    text = tmp_path / "my calibration text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    calib = CalibConfig(str(text), n_samples=4, seqlen=32, batch_size=2, seed=12345)
    out = tmp_path / "t.gguf"
    llmq.convert(tiny, out, llmq.QuantConfig(quant="Q4_0"), calib=calib, progress=False, write_card=False)
    value = gguf.GGUFReader(out).fields["llmq.awq"].contents()
    assert value.startswith("calib=my_calibration_text.txt samples=4x32 seed=12345 scale=duo")
    ours = kv_bytes("llmq.awq", value)
    llama = sum(
        kv_bytes(k, v)
        for k, v in {
            "quantize.imatrix.file": "i",
            "quantize.imatrix.dataset": text.name,
            "quantize.imatrix.entries_count": 210,
            "quantize.imatrix.chunks_count": 4,
        }.items()
    )
    assert ours < llama, (ours, llama, value)
    # kv_bytes counts what the file really holds for the pair
    r = gguf.GGUFReader(out)
    assert kv_bytes("llmq.awq", value) == sum(int(p.nbytes) for p in r.fields["llmq.awq"].parts)


@pytest.mark.parametrize(
    "cfg", [llmq.QuantConfig(quant="Q4_0"), llmq.QuantConfig(bits=4, group_size=64, sym=True)]
)
def test_awq_beats_rtn_on_a_model_with_outlier_channels(tmp_path: Path, cfg: llmq.QuantConfig) -> None:
    model = make_tiny_llama(
        tmp_path / "m", n_layers=2, hidden=128, intermediate=256, dtype=torch.float32, outliers=10.0
    )
    calib = CalibConfig("self", n_samples=16, seqlen=64, batch_size=8)
    rtn = llmq.convert(
        model, tmp_path / "rtn.gguf", llmq.QuantConfig(**{**cfg.__dict__, "method": "rtn"}), progress=False
    )
    awq = llmq.convert(model, tmp_path / "awq.gguf", cfg, calib=calib, progress=False)
    tokens = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(9))
    kl_rtn, kl_awq = logit_kl(model, rtn.path, tokens), logit_kl(model, awq.path, tokens)
    assert kl_awq < 0.8 * kl_rtn, (kl_awq, kl_rtn)


def test_quantize_api_matches_convert_and_takes_own_tokens(tiny: Path, tmp_path: Path) -> None:
    tokens = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(5))
    cfg = llmq.QuantConfig(quant="Q4_0")
    qm = llmq.quantize(tiny, cfg, calib=tokens, progress=False)
    res = llmq.convert(tiny, tmp_path / "q.gguf", cfg, calib=tokens, progress=False)
    stored = {
        t.name: np.asarray(t.data).view(np.uint8).reshape(-1) for t in gguf.GGUFReader(res.path).tensors
    }
    assert set(stored) == set(qm.data)
    for name, data in qm.data.items():
        assert np.array_equal(data.reshape(-1), stored[name]), name
    w = qm.dequantize("model.layers.0.mlp.down_proj.weight")
    assert w.shape == (128, 256) and w.dtype == np.float32
    assert qm.report()[0]["layer"] == 0 and qm.calibration is not None
    # one's own scale groups: without any, the search only clips
    none = llmq.quantize(tiny, cfg, calib=tokens, scale_groups=(), progress=False)
    assert none.report()[0]["scales"] == []


def test_quantize_api_accepts_a_loaded_model(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    tokens = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(5))
    a = llmq.quantize(model, llmq.QuantConfig(quant="Q4_0"), calib=tokens, progress=False)
    b = llmq.quantize(tiny, llmq.QuantConfig(quant="Q4_0"), calib=tokens, progress=False)
    assert all(np.array_equal(a.data[k], b.data[k]) for k in a.data)
    with pytest.raises(llmq.LlmqError, match="expected a path"):
        llmq.quantize(42)


@pytest.mark.parametrize("forward", ["float32", "bfloat16"])
def test_imatrix_is_the_mean_square_of_each_linear_input(
    tiny: Path, forward: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llmq's importance matrix equals mean x^2 of every linear's input in the whole HF model's float32
    forward; with bfloat16 forwards (`CalibConfig.forward_dtype`), to bfloat16's precision."""
    from transformers import AutoModelForCausalLM

    import llmq.activations
    from llmq.imatrix import compute_imatrix

    monkeypatch.setattr(llmq.activations, "resolve_dtype", lambda _name, _device: forward)
    tokens = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(4))
    imat = compute_imatrix(tiny, tokens, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, a, n=name: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]))
        )
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in name
    ]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    names = {"self_attn.q_proj": "attn_q", "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down"}
    for layer in range(2):
        for hf, gg in names.items():
            want = (seen[f"model.layers.{layer}.{hf}"] ** 2).mean(0).numpy()
            rtol = 2e-4 if forward == "float32" else 3e-2
            np.testing.assert_allclose(imat[f"blk.{layer}.{gg}.weight"], want, rtol=rtol, atol=1e-7)
    assert len(imat) == 2 * 7


def test_cli_awq_offline_with_builtin_calibration(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmq.cli import main

    out = tmp_path / "s.gguf"
    argv = [
        "convert",
        str(tiny),
        "-o",
        str(out),
        "--quant",
        "Q4_0",
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "32",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "calibration: builtin, up to 4 x 32 tokens" in captured.err  # said before it starts
    assert re.search(
        r"calibration work: [\d.e+-]+ TFLOP per layer .* GFLOP/s, so at least .* for 2 layers", captured.err
    )
    assert "AWQ calibrated on builtin" in captured.out
    fields = gguf.GGUFReader(out).fields
    settings = parse_awq_text(fields["llmq.awq"].contents())
    assert settings["clip"] == "on" and settings["inputs"] == "quant"  # Q4_0's measured recipe
    assert out.with_suffix(".search.json").is_file()
    code = main(["convert", "--method", "rtn", str(tiny), "-o", str(tmp_path / "r.gguf"), "--calib", "x.txt"])
    assert code == 2 and "--calib applies to --method awq" in capsys.readouterr().err
    code = main(
        ["convert", str(tiny), "-o", str(tmp_path / "m.gguf"), "--calib", str(tmp_path / "missing.txt")]
    )
    assert code == 2 and "missing.txt: calibration file not found" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "r.gguf").exists()


def test_block_errors_match_a_loop_over_groups() -> None:
    from llmq.clip import block_errors

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(300, 160, generator=gen)
    gram = x.T @ x / 300
    e = torch.randn(7, 160, generator=gen)
    for group in (32, 64, -1):
        bounds = group_bounds(160, group)
        want = torch.stack([((e[:, a:b] @ gram[a:b, a:b]) * e[:, a:b]).sum(1) for a, b in bounds], 1)
        torch.testing.assert_close(block_errors(e, gram, bounds), want, rtol=1e-5, atol=1e-6)


def test_sampled_scoring_is_the_mean_row_error_of_a_fixed_sample() -> None:
    from llmq.activations import InputStats
    from llmq.awq import sample_rows, scale_losses
    from llmq.clip import row_errors

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(400, 64, generator=gen) * torch.linspace(0.2, 5, 64)
    st = InputStats(64)
    st.add(x)
    w = torch.randn(96, 64, generator=gen)
    s = torch.rand(64, generator=gen) + 0.5
    t = Target("Q4_0", 32, EncoderConfig())
    rows = sample_rows(w, 16)
    assert torch.equal(rows, sample_rows(w, 16)) and rows.shape == (16, 64)  # seeded by the shape
    assert {tuple(r.tolist()) for r in rows} <= {tuple(r.tolist()) for r in w}
    assert sample_rows(w, 0) is w and sample_rows(w, 96) is w
    q = torch.from_numpy(t.fake_quant((rows * s).numpy(), st.mean_sq / (s.numpy() ** 2))) / s
    want = float(row_errors(rows - q, st.mean_gram).mean())
    base, scaled = scale_losses([w], [t], st, [None, s], sample=16)
    assert scaled == pytest.approx(want, rel=1e-5)
    full = float(row_errors(w - torch.from_numpy(t.fake_quant(w.numpy(), st.mean_sq)), st.mean_gram).mean())
    assert scale_losses([w], [t], st, [None], sample=0)[0] == pytest.approx(full, rel=1e-5)
    with pytest.raises(llmq.LlmqError, match="sample_rows"):
        AWQConfig(sample_rows=-1)


def test_fast_scoring_drops_only_the_refinement() -> None:
    from llmq.activations import InputStats
    from llmq.awq import scale_losses

    gen = torch.Generator().manual_seed(8)
    st = InputStats(256)
    st.add(torch.randn(600, 256, generator=gen))
    w = torch.randn(8, 256, generator=gen)
    refined = Target("Q4_K", 256, EncoderConfig(refine=True))
    plain = Target("Q4_K", 256, EncoderConfig(refine=False))
    fast = scale_losses([w], [refined], st, [None], exact=False)
    assert fast == scale_losses([w], [plain], st, [None])
    assert fast != scale_losses([w], [refined], st, [None])


def test_weight_mean_in_row_slabs_is_autoawqs_w_mean() -> None:
    from llmq.awq import _weight_mean

    gen = torch.Generator().manual_seed(9)
    ws = [torch.randn(100, 96, generator=gen), torch.randn(50, 96, generator=gen) * 3]
    for group in (32, -1):
        w = torch.cat(ws, 0).abs()
        parts = [w[:, a:b] / w[:, a:b].amax(dim=1, keepdim=True) for a, b in group_bounds(96, group)]
        torch.testing.assert_close(_weight_mean(ws, group, rows=7), torch.cat(parts, 1).mean(0))


@pytest.mark.parametrize(
    ("curve", "stride", "want"),
    [
        ([5, 4, 3, 2, 1.5, 1, 2, 3] + [4] * 12, 4, 5),  # the best lies between coarse points
        ([5, 4, 3, 2, 1.5, 1, 2, 3] + [4] * 12, 1, 5),
        ([9] * 16 + [3, 2.5, 2, 1], 4, 19),  # past the last coarse point
        ([3, 1, 1, 2] + [4] * 16, 4, 1),  # ties go to the lowest exponent
        ([9] * 20, 4, None),  # nothing beats the unscaled weights (loss 6)
        ([6] * 20, 4, None),  # an equal loss does not either
        ([1, 8, 8, 8, 9, 9, 9, 9, 0.5] + [9] * 11, 4, 8),  # a second valley the coarse points see
    ],
)
def test_best_scale_scores_coarse_then_fine(
    curve: list[float], stride: int, want: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmq import awq
    from llmq.activations import InputStats

    st = InputStats(8)
    st.add(torch.rand(32, 8) + 0.1)
    w = torch.randn(4, 8)
    cfg = AWQConfig(coarse_stride=stride)
    alphas, cands = awq.candidate_scales([w], [Target("Q8_0", 32)], st, cfg)
    scored: list[int] = []

    def losses(ws, ts, st, candidates, sample, exact, dtype):  # type: ignore[no-untyped-def]
        idx = [
            -1 if c is None else next(i for i, k in enumerate(cands) if torch.equal(k, c)) for c in candidates
        ]
        scored.extend(idx)
        return [6.0 if i < 0 else curve[i] for i in idx]

    monkeypatch.setattr(awq, "scale_losses", losses)
    choice = awq.best_scale([w], [Target("Q8_0", 32)], st, cfg)
    assert len(scored) == len(set(scored))  # no candidate scored twice
    assert (choice.alpha, choice.base) == ((None if want is None else alphas[want]), 6.0)
    assert choice.loss == (6.0 if want is None else curve[want])
    assert (choice.s is None) == (want is None)
    if stride == 1:
        assert sorted(scored) == list(range(-1, 20))
    else:  # the coarse points, then the window around their best
        assert {-1, 0, 4, 8, 12, 16} <= set(scored) and len(scored) <= 6 + 2 * (stride - 1)
    with pytest.raises(llmq.LlmqError, match="coarse_stride"):
        AWQConfig(coarse_stride=0)


def test_bfloat16_scoring_ranks_candidates_as_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """`AWQConfig.score_dtype`: the candidates' ``E @ G`` in bfloat16 (sums in float32) gives losses
    within bfloat16's rounding of float32's and the same pick; ``auto`` follows the CPU's bf16 support."""
    from llmq.activations import InputStats
    from llmq.awq import candidate_scales, scale_losses

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(512, 256, generator=gen) * (torch.rand(256, generator=gen) ** 4 * 30 + 0.1)
    st = InputStats(256)
    st.add(x)
    ws = [torch.randn(48, 256, generator=gen) * 0.05, torch.randn(32, 256, generator=gen) * 0.05]
    ts = [Target("Q4_K", 256, EncoderConfig())] * 2
    cands = [None, *candidate_scales(ws, ts, st, AWQConfig())[1]]
    f32 = scale_losses(ws, ts, st, cands, dtype="float32")
    b16 = scale_losses(ws, ts, st, cands, dtype="bfloat16")
    assert f32 != b16  # the products did run in bfloat16
    assert b16 == pytest.approx(f32, rel=2e-3)
    assert min(range(len(f32)), key=f32.__getitem__) == min(range(len(b16)), key=b16.__getitem__)
    e, g = ws[0], st.gram
    assert output_error(e, g.bfloat16()) == float(((e.bfloat16() @ g.bfloat16()).float() * e).sum())
    for native, want in ((False, f32), (True, b16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert scale_losses(ws, ts, st, cands, dtype="auto") == want
    with pytest.raises(llmq.LlmqError, match="score_dtype"):
        AWQConfig(score_dtype="float16")
