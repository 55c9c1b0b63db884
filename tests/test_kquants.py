"""K-quant codecs (Q2_K .. Q6_K) against llama.cpp itself, and their decoders against gguf-py.

gguf-py cannot quantize K-quants, so the reference bytes come from libggml's `ggml_quantize_chunk`
(shipped inside llama-cpp-python): with no importance it runs `quantize_row_q*_K_ref`, with an
importance matrix the weighted `quantize_row_q*_K_impl`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import quants
from kquant_cases import MIN_IDENTICAL, GgmlQuantize, cases, importances, random_bytes
from llmq.kernels import dequantize, matmul

from llmq.codecs import REGISTRY, Codec

K_QUANTS = sorted(n for n in REGISTRY if n.endswith("_K"))


def _sq_error(
    codec: type[Codec], data: np.ndarray, x: np.ndarray, importance: np.ndarray | None
) -> np.ndarray:
    back = quants.dequantize(data, codec.qtype).reshape(x.shape).astype(np.float64)
    err = (back - x) ** 2 * (1.0 if importance is None else importance[None, :])
    return err.reshape(-1, codec.block_size).sum(axis=1)


def _assert_agrees(
    codec: type[Codec], x: np.ndarray, ref: np.ndarray, label: str, importance: np.ndarray | None = None
) -> None:
    ours = codec.encode(x, importance)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    same = (ours.reshape(-1, codec.type_size) == ref.reshape(-1, codec.type_size)).all(axis=1)
    assert same.mean() >= MIN_IDENTICAL, f"{codec.name} {label}: {same.sum()}/{same.size} blocks identical"
    if not same.all():  # a rounding tie may pick another candidate; it must not be worse
        e_ours = _sq_error(codec, ours, x, importance)[~same]
        e_ref = _sq_error(codec, ref, x, importance)[~same]
        assert (e_ours <= e_ref * (1 + 1e-6) + 1e-30).all(), f"{codec.name} {label}: worse than ggml"


def test_registry_has_the_k_quants() -> None:
    assert K_QUANTS == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    for name in K_QUANTS:
        codec = REGISTRY[name]
        assert codec.block_size == 256 and codec.supports_importance and not codec.is_float


@pytest.mark.parametrize("name", K_QUANTS)
def test_encode_matches_ggml_reference(name: str, ggml_quantize: GgmlQuantize) -> None:
    codec = REGISTRY[name]
    for label, x in cases(np.random.default_rng(20)).items():
        _assert_agrees(codec, x, ggml_quantize(codec, x), label)


@pytest.mark.parametrize("name", K_QUANTS)
def test_encode_matches_ggml_on_smollm2(
    name: str, reference_model_dir: Path, ggml_quantize: GgmlQuantize
) -> None:
    from safetensors import safe_open

    codec = REGISTRY[name]
    keys = ["model.layers.3.mlp.down_proj.weight", "model.layers.5.self_attn.q_proj.weight"]  # rows 1536, 576
    with safe_open(str(reference_model_dir / "model.safetensors"), "pt") as f:
        for key in keys:
            x = f.get_tensor(key).float().numpy()[:96]
            if x.shape[1] % codec.block_size:
                x = x[:, : x.shape[1] // codec.block_size * codec.block_size]
            _assert_agrees(codec, np.ascontiguousarray(x), ggml_quantize(codec, x), key)


@pytest.mark.parametrize("name", K_QUANTS)
def test_weighted_encode_matches_ggml(name: str, ggml_quantize: GgmlQuantize) -> None:
    codec = REGISTRY[name]
    rng = np.random.default_rng(24)
    for label, x in cases(rng).items():
        for ilabel, imp in importances(rng, x.shape[1]).items():
            _assert_agrees(codec, x, ggml_quantize(codec, x, imp), f"{label}/{ilabel}", imp)


@pytest.mark.parametrize("name", K_QUANTS)
def test_weighted_encode_matches_ggml_on_smollm2(
    name: str, reference_model_dir: Path, ggml_quantize: GgmlQuantize
) -> None:
    """Real rows of 1536 (ffn_down, K-quantized in the mixes) with an importance of real spread."""
    from safetensors import safe_open

    codec = REGISTRY[name]
    with safe_open(str(reference_model_dir / "model.safetensors"), "pt") as f:
        x = np.ascontiguousarray(f.get_tensor("model.layers.7.mlp.down_proj.weight").float().numpy()[:128])
    imp = importances(np.random.default_rng(25), x.shape[1])["lognormal"]
    ours = codec.encode(x, imp)
    _assert_agrees(codec, x, ggml_quantize(codec, x, imp), "down_proj", imp)
    # the importance changes the bytes: it is not ignored
    assert not np.array_equal(ours, codec.encode(x))


@pytest.mark.parametrize("name", K_QUANTS)
def test_decode_equals_gguf_dequantize(name: str, ggml_quantize: GgmlQuantize) -> None:
    codec = REGISTRY[name]
    rng = np.random.default_rng(21)
    x = cases(rng)["extreme"]
    for label, data in {
        "ggml bytes": ggml_quantize(codec, x),
        "random bytes": random_bytes(codec, 48, rng).reshape(24, -1),
    }.items():
        ref = quants.dequantize(data, codec.qtype).reshape(x.shape)
        ours = codec.decode(data, x.shape)
        assert ours.dtype == np.float32
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"{name} {label}"
        kern = dequantize(data, name, x.shape)
        assert np.array_equal(kern.view(np.uint32), ref.view(np.uint32)), f"{name} kernel {label}"


@pytest.mark.parametrize("name", K_QUANTS)
def test_kernel_matmul_on_ggml_bytes(name: str, ggml_quantize: GgmlQuantize) -> None:
    codec = REGISTRY[name]
    rng = np.random.default_rng(22)
    w = rng.standard_normal((40, 512)).astype(np.float32)
    data = ggml_quantize(codec, w)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    want = x @ dequantize(data, name, w.shape).T
    for tile_rows in (7, 64):
        got = matmul(x, data, name, w.shape, tile_rows=tile_rows)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_more_bits_less_error() -> None:
    x = np.random.default_rng(23).standard_normal((32, 512)).astype(np.float32)
    errs = [float(((REGISTRY[n].decode(REGISTRY[n].encode(x), x.shape) - x) ** 2).mean()) for n in K_QUANTS]
    assert errs == sorted(errs, reverse=True), dict(zip(K_QUANTS, errs, strict=True))
    assert errs[-1] < 1e-3 < errs[0]  # Q6_K near lossless, Q2_K coarse
