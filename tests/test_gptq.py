"""Error-feedback rounding (`llmq.gptq`, ``--awq-gptq``) and the codecs' integer grids it works on."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import convert_awq_pair, make_tiny_llama

from llmq.codecs import REGISTRY
from llmq.encoding import EncoderConfig, encode_tensor
from llmq.errors import LlmqError
from llmq.gptq import encode_feedback, feedback_factor
from llmq.plan import TensorPlan

GRID = sorted(n for n, c in REGISTRY.items() if c.supports_grid)


def _correlated(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(n, k)`` with correlated columns and uneven scales, and their second moment."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((n, k)) @ mix * np.exp(rng.standard_normal(k))
    return x, x.T @ x / n


def _output_error(w: np.ndarray, y: np.ndarray, h: np.ndarray) -> float:
    e = (w - y).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", e, h, e))


def test_the_grid_types() -> None:
    assert GRID == ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]


@pytest.mark.parametrize("name", GRID)
def test_grid_decodes_like_the_codec_and_repacks_to_the_same_bytes(name: str) -> None:
    codec = REGISTRY[name]
    x = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    data = codec.encode(x, np.linspace(0.5, 2, 512, dtype=np.float32)).reshape(-1, codec.type_size)
    step, offset, codes, lo, hi = codec.grid_blocks(data)
    assert step.shape == offset.shape == codes.shape == (data.shape[0], codec.block_size)
    assert lo <= codes.min() and codes.max() <= hi
    np.testing.assert_allclose(
        step * codes.astype(np.float32) + offset, codec.decode_blocks(data), rtol=0, atol=1e-6
    )
    np.testing.assert_array_equal(codec.with_codes(data, codes), data)
    other = np.clip(codes.astype(np.int32) + 1, lo, hi)  # new codes land where the grid says
    np.testing.assert_allclose(
        codec.decode_blocks(codec.with_codes(data, other)), step * other + offset, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("name", GRID)
def test_feedback_lowers_the_output_error_and_keeps_the_scales(name: str) -> None:
    codec = REGISTRY[name]
    k = 512
    inputs, h = _correlated(k, 4096, 1)
    w = np.random.default_rng(2).standard_normal((16, k)).astype(np.float32)
    imp = np.diagonal(h).astype(np.float32)
    plain = codec.encode(w, imp)
    fed = encode_feedback(codec, w, feedback_factor(h), imp, refine=False)
    assert fed.shape == plain.shape and fed.dtype == np.uint8
    e_plain = _output_error(w, codec.decode(plain, w.shape), h)
    e_fed = _output_error(w, codec.decode(fed, w.shape), h)
    assert e_fed < 0.9 * e_plain, (name, e_fed / e_plain)
    # the real activations' output error, not only the Gram's
    y_plain, y_fed = inputs @ codec.decode(plain, w.shape).T, inputs @ codec.decode(fed, w.shape).T
    assert np.square(inputs @ w.T - y_fed).mean() < np.square(inputs @ w.T - y_plain).mean()
    a, b = (codec.grid_blocks(d.reshape(-1, codec.type_size)) for d in (plain, fed))
    np.testing.assert_array_equal(a[0], b[0])  # same scales and mins: only the codes moved
    np.testing.assert_array_equal(a[1], b[1])
    # gguf's dequantizer reads the bytes as ours does
    np.testing.assert_array_equal(
        gguf.quants.dequantize(fed, codec.qtype).reshape(w.shape), codec.decode(fed, w.shape)
    )


@pytest.mark.parametrize("name", GRID)
def test_feedback_with_independent_inputs_is_nearest_rounding(name: str) -> None:
    # nothing to push onto other columns: every value takes its nearest code on the stored grid, so
    # no value is further from the weight than the encoder's own code puts it
    codec = REGISTRY[name]
    w = np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32)
    imp = np.ones(256, np.float32)
    fed = encode_feedback(codec, w, feedback_factor(np.eye(256)), imp, refine=False)
    plain = codec.encode(w, imp)
    e_fed = np.abs(w - codec.decode(fed, w.shape))
    e_plain = np.abs(w - codec.decode(plain, w.shape))
    assert (e_fed <= e_plain + 1e-6).all(), name
    assert (fed != plain).mean() < 0.01, name


@pytest.mark.parametrize("name", GRID)
def test_the_compiled_column_loop_gives_numpys_codes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gptq_jit.feedback_block` replays NumPy's per-column loop row by row: the same bytes, dead
    values (zero steps) and outlier rows included."""
    from llmq import gptq

    codec = REGISTRY[name]
    k = 768  # six blocks of 128 columns over three super-blocks
    x, h = _correlated(k, 2048, 11)
    w = np.random.default_rng(12).standard_normal((24, k)).astype(np.float32)
    w[3, :256] = 0.0  # zero steps
    w[5] *= 1e3
    factor = feedback_factor(h)
    imp = np.diag(h).astype(np.float32)
    monkeypatch.setattr(gptq, "COMPILED", False)
    want = encode_feedback(codec, w, factor, imp, refine=False)
    monkeypatch.setattr(gptq, "COMPILED", True)
    got = encode_feedback(codec, w, factor, imp, refine=False)
    assert not np.array_equal(want, codec.encode(w, imp))  # feedback re-chose codes
    np.testing.assert_array_equal(got, want)


def test_feedback_factor_inverts_the_damped_second_moment() -> None:
    _, h = _correlated(64, 1024, 5)
    h[:, 7] = h[7, :] = 0  # a dead input column
    u = feedback_factor(h, damp=0.01)
    assert np.allclose(u, np.triu(u))
    damped = h.copy()
    damped[7, 7] = 1.0
    damped[np.diag_indices(64)] += 0.01 * np.diagonal(damped).mean()
    np.testing.assert_allclose(u.T.astype(np.float64) @ u @ damped, np.eye(64), atol=1e-5)  # float32 factor
    with pytest.raises(LlmqError, match="square"):
        feedback_factor(np.ones((3, 4)))
    for bad in (np.nan, np.inf, -np.inf):
        h2 = h.copy()
        h2[3, 5] = bad
        with pytest.raises(LlmqError, match="finite"):
            feedback_factor(h2)
    with pytest.raises(LlmqError, match="Q3_K has no integer grid"):
        encode_feedback(REGISTRY["Q3_K"], np.ones((1, 256), np.float32), np.eye(256), None, refine=False)


def test_pipeline_encode_falls_back_where_a_type_has_no_grid() -> None:
    x = torch.randn(4, 256)
    _, h = _correlated(256, 1024, 6)
    for name, changes in (("Q3_K", False), ("Q6_K", True)):
        plan = TensorPlan(
            "blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", (4, 256), name, 256, 0, "linear"
        )
        plain, fed = (
            encode_tensor(plan, x),
            encode_tensor(plan, x, gram=h, encoder=EncoderConfig(feedback=True)),
        )
        assert (plain.tobytes() != fed.tobytes()) == changes, name


def test_stacked_experts_take_their_own_factor() -> None:
    """Stacked experts ``(E, rows, K)`` are encoded one by one, each with its own routed tokens'
    factor (None: an expert that saw too few tokens keeps the importance-weighted encoding)."""
    e, rows, k = 3, 6, 256
    rng = np.random.default_rng(7)
    w = torch.from_numpy(rng.standard_normal((e, rows, k)).astype(np.float32))
    imp = np.abs(rng.standard_normal((e, k))).astype(np.float32) + 0.1
    factors = [feedback_factor(_correlated(k, 1024, 10 + i)[1]) for i in range(e - 1)] + [None]
    plan = TensorPlan("blk.0.ffn_down_exps.weight", None, (e, rows, k), "Q4_K", 256, 0, "linear")
    enc = EncoderConfig(feedback=True)
    out = encode_tensor(plan, w, imp, encoder=enc, factor=factors)
    plain = encode_tensor(plan, w, imp)
    for i in range(e):
        alone = encode_tensor(plan, w[i], imp[i], encoder=enc, factor=factors[i])
        assert np.array_equal(out[i], alone), i
        assert np.array_equal(out[i], plain[i]) == (factors[i] is None), i


def test_awq_gptq_through_the_cli(tmp_path: Path) -> None:
    words, tensors, report = convert_awq_pair(tmp_path, "feedback")
    assert words[True]["gptq"] == "on"
    assert "gptq" not in words[False]
    assert report["encoder"]["feedback"] is True
    changed = 0
    for name, t in tensors[True].items():
        other = tensors[False][name]
        assert t.tensor_type == other.tensor_type  # the same mix, type for type
        changed += t.data.tobytes() != other.data.tobytes()
    assert changed > 0
    # only linears with calibration statistics change: the embedding is encoded as before
    assert (
        tensors[True]["token_embd.weight"].data.tobytes()
        == tensors[False]["token_embd.weight"].data.tobytes()
    )


def test_default_recipe_of_k_mixes(tmp_path: Path) -> None:
    # the measured best recipe for K mixes is the default: fp inputs, no clip, refinement, feedback
    from llmq.cli import main
    from llmq.report import parse_awq_text

    model = make_tiny_llama(tmp_path / "m", hidden=256, intermediate=512, dtype=torch.float32)
    out = tmp_path / "x.gguf"
    args = ["convert", str(model), "--quant", "Q4_K_M", "--calib-samples", "4", "--calib-seqlen", "32", "-q"]
    assert main([*args, "-o", str(out)]) == 0
    words = parse_awq_text(gguf.GGUFReader(out).fields["llmq.awq"].contents())
    assert (words["gptq"], words["refine"], words["clip"], words["inputs"]) == ("on", "on", "off", "fp")


def test_flip_reverses_rows_and_columns_in_place() -> None:
    from llmq.gptq import flip_

    for n in (1, 2, 3, 7, 64, 65):
        a = torch.randn(n, n)
        want = a.flip(0, 1).clone()
        assert flip_(a, step=5) is a
        assert torch.equal(a, want), n
