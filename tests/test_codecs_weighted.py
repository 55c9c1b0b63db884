"""Importance-weighted encoders against llama.cpp itself (`ggml_quantize_chunk` with an imatrix).

libggml ships inside llama-cpp-python; calling it through ctypes runs exactly the C code
(`quantize_row_q*_impl`, `make_qx_quants`, `make_qkx3_quants`) our NumPy encoders mirror.
Every codec with ``supports_importance`` is covered, so a new one is tested for free.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import quants

from llmq.codecs import REGISTRY, Codec, GroupCodec
from llmq.errors import FormatError

WEIGHTED = sorted(n for n, c in REGISTRY.items() if c.supports_importance)
QUANTIZED = sorted(n for n, c in REGISTRY.items() if not c.is_float)
GROUPED_WEIGHTED = sorted(n for n in WEIGHTED if issubclass(REGISTRY[n], GroupCodec))
# the shared libggml fixture (tests/conftest.py): f(codec, x, importance=None) -> bytes
GgmlQuantize = Callable[..., np.ndarray]
MIN_IDENTICAL = 0.999  # fraction of blocks that must be byte-identical to ggml's


def _weighted_error(
    codec: type[Codec], data: np.ndarray, x: np.ndarray, importance: np.ndarray
) -> np.ndarray:
    # per block: sum of qw * (decoded - x)^2, qw the weights llama.cpp's search minimizes
    w = codec.encoder_weights(x, importance).astype(np.float64)
    err = w * (codec.decode(data, x.shape).astype(np.float64) - x) ** 2
    return err.reshape(-1, codec.block_size).sum(axis=1)


def _assert_agrees(
    codec: type[Codec], x: np.ndarray, importance: np.ndarray, ref: np.ndarray, label: str
) -> None:
    ours = codec.encode(x, importance)
    same = (ours.reshape(-1, codec.type_size) == ref.reshape(-1, codec.type_size)).all(axis=1)
    assert same.mean() >= MIN_IDENTICAL, f"{codec.name} {label}: {same.sum()}/{same.size} blocks identical"
    if not same.all():  # a rounding tie may pick another candidate; it must not be worse
        e_ours = _weighted_error(codec, ours, x, importance)[~same]
        e_ref = _weighted_error(codec, ref, x, importance)[~same]
        assert (e_ours <= e_ref * (1 + 1e-6) + 1e-30).all(), f"{codec.name} {label}: worse than ggml"


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((40, 512)).astype(np.float32)
    x[0] = 0.0  # all-zero blocks
    x[1, :32] = 3.0  # constant block
    x[2] *= 1e-7  # f16-subnormal scales
    x[3] *= 1.5e4  # scales and mins near the f16 maximum
    x[4, ::2] = -x[4, 1::2]  # |max| ties of opposite sign
    x[5, 7] = 50.0  # an outlier
    x[6] = np.abs(x[6])  # all-positive blocks: the min clamps to 0
    x[7] = -np.abs(x[7])
    x[8, :64] = -0.0  # signed zeros around one value
    x[8, 3] = 2.0
    x[9] = rng.integers(-16, 16, 512) / 2  # exact halves: rounding ties
    importance = np.exp(rng.standard_normal(512)).astype(np.float32)
    importance[32:64] = 0.0  # dead columns: zero weight for a whole block
    importance[100:110] = 0.0
    return x, importance


@pytest.mark.parametrize("name", WEIGHTED)
def test_weighted_matches_ggml_on_random_rows(name: str, ggml_quantize: GgmlQuantize) -> None:
    codec = REGISTRY[name]
    rng = np.random.default_rng(10)
    x, importance = _random_case(rng)
    _assert_agrees(codec, x, importance, ggml_quantize(codec, x, importance), "random")
    ones = np.ones(x.shape[1], np.float32)
    _assert_agrees(codec, x, ones, ggml_quantize(codec, x, ones), "uniform importance")


@pytest.mark.parametrize("name", WEIGHTED)
def test_weighted_matches_ggml_on_smollm2(
    name: str, reference_model_dir: Path, ggml_quantize: GgmlQuantize
) -> None:
    from safetensors import safe_open

    codec = REGISTRY[name]
    rng = np.random.default_rng(11)
    keys = ["model.layers.3.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight"]  # rows 1536, 576
    with safe_open(str(reference_model_dir / "model.safetensors"), "pt") as f:
        for key in keys:
            x = f.get_tensor(key).float().numpy()
            if not codec.can_store(x.shape):  # K-quants: rows of 576 fall back to legacy types
                continue
            k = x.shape[1]
            # mean square of activations with a realistic per-channel spread (an imatrix)
            acts = rng.standard_normal((64, k)) * np.exp(rng.standard_normal(k))
            importance = (acts**2).mean(axis=0).astype(np.float32)
            _assert_agrees(codec, x, importance, ggml_quantize(codec, x, importance), key)


@pytest.mark.parametrize("name", QUANTIZED)
def test_without_importance_support_bytes_are_reference_rtn(name: str, ggml_quantize: GgmlQuantize) -> None:
    codec = REGISTRY[name]
    x, importance = _random_case(np.random.default_rng(12))
    rtn = codec.encode(x)
    assert np.array_equal(codec.encode(x, None), rtn)
    assert np.array_equal(ggml_quantize(codec, x, None), rtn)
    if not codec.supports_importance:  # llmq validates, then ignores the importance
        assert np.array_equal(codec.encode(x, importance), rtn)
        if not name.endswith("_K"):  # llama.cpp ignores quant_weights too (Q8_0), not for K-quants
            assert np.array_equal(ggml_quantize(codec, x, importance), rtn)


@pytest.mark.parametrize("name", WEIGHTED)
def test_uniform_importance_lowers_weighted_error(name: str) -> None:
    codec = REGISTRY[name]
    x = np.random.default_rng(13).standard_normal((32, 512)).astype(np.float32)
    ones = np.ones(512, np.float32)
    searched = _weighted_error(codec, codec.encode(x, ones), x, ones).mean()
    rtn = _weighted_error(codec, codec.encode(x), x, ones).mean()
    assert searched <= rtn, (searched, rtn)


@pytest.mark.parametrize("name", GROUPED_WEIGHTED)
@pytest.mark.parametrize("group", [64, 128, -1])
def test_grouped_weighted_shares_parameters(name: str, group: int) -> None:
    codec = REGISTRY[name]
    rng = np.random.default_rng(14)
    x = rng.standard_normal((6, 576)).astype(np.float32)  # 576 = 4*128 + 64
    importance = np.exp(rng.standard_normal(576)).astype(np.float32)
    data = codec.encode_grouped(x, group, importance)
    weights = codec.encoder_weights(x, importance)
    blocks = data.reshape(6, -1, codec.type_size)
    header = 2 if codec.symmetric else 4  # d (and m) lead every legacy block
    g = 576 if group == -1 else group
    for row in range(6):
        for s in range(0, 576, g):
            e = min(s + g, 576)
            params = blocks[row, s // 32 : e // 32, :header]
            assert (params == params[0]).all(), "blocks of one group must carry the same scale"
            # the group is llama.cpp's weighted search run over it as one wide block
            d, m, codes = codec.search_params(x[row : row + 1, s:e], weights[row : row + 1, s:e])
            n = (e - s) // 32
            ref = codec.pack_codes(codes.reshape(n, 32), np.repeat(d, n, 0), np.repeat(m, n, 0))
            assert np.array_equal(blocks[row, s // 32 : e // 32], ref)
    np.testing.assert_array_equal(
        codec.decode(data, x.shape), quants.dequantize(data, codec.qtype).reshape(x.shape)
    )
    assert np.array_equal(codec.encode_grouped(x, 32, importance), codec.encode(x, importance))
    assert np.array_equal(codec.encode_grouped(x, group), codec.encode_grouped(x, group, None))


def test_importance_flag_marks_llama_cpp_weighted_types() -> None:
    assert set(WEIGHTED) >= {"Q4_0", "Q4_1", "Q5_0", "Q5_1"}
    assert not REGISTRY["Q8_0"].supports_importance
    assert not any(c.supports_importance for c in REGISTRY.values() if c.is_float)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_bad_importance_is_a_format_error(name: str) -> None:
    codec = REGISTRY[name]
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(FormatError, match=r"\(2, 64\).*\(64,\)"):
        codec.encode(x, np.ones(32, np.float32))
    with pytest.raises(FormatError, match="finite and >= 0"):
        codec.encode(x, -np.ones(64, np.float32))
    with pytest.raises(FormatError, match="finite and >= 0"):
        codec.encode_grouped(x, 64, np.full(64, np.nan, np.float32))
    with pytest.raises(FormatError, match="real numbers"):
        codec.encode(x, np.array(["a"] * 64))
