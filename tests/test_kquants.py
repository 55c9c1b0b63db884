"""K-quant codecs (Q2_K .. Q6_K) against llama.cpp itself, and their decoders against gguf-py.

gguf-py cannot quantize K-quants, so the reference bytes come from libggml's `ggml_quantize_chunk`
(shipped inside llama-cpp-python): with no importance it runs `quantize_row_q*_K_ref`, with an
importance matrix the weighted `quantize_row_q*_K_impl`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import quants
from llmq.kernels import dequantize, matmul

from llmq.codecs import REGISTRY, Codec

K_QUANTS = sorted(n for n in REGISTRY if n.endswith("_K"))
# the shared libggml fixture (tests/conftest.py): f(codec, x, importance=None) -> bytes
GgmlQuantize = Callable[..., np.ndarray]
MIN_IDENTICAL = 0.999  # fraction of blocks that must be byte-identical to ggml's


def _cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    normal = rng.standard_normal((64, 512)).astype(np.float32)
    scaled = normal * rng.choice(np.array([1e-6, 1e-3, 1.0, 30.0, 1e4], np.float32), (64, 1))
    x = rng.standard_normal((24, 512)).astype(np.float32)
    x[0] = 0.0  # all-zero super-blocks
    x[1, :256] = 3.0  # constant super-blocks, positive and negative
    x[1, 256:] = -2.5
    x[2, 7] = 1e3  # one huge outlier
    x[3, 300] = -5e4
    x[4] = np.abs(x[4])  # all-positive: mins clamp to 0
    x[5] = -np.abs(x[5])
    x[6, :64] = -0.0  # signed zeros around one value
    x[6, 3] = 2.0
    x[7] = rng.integers(-16, 16, 512) / 2  # exact halves: rounding ties
    x[8] *= 1e-7  # f16-subnormal scales
    x[9] *= 1.5e4  # scales near the f16 maximum
    x[10, ::2] = -x[10, 1::2]  # |max| ties of opposite sign
    # sub-blocks of 16 scaled independently, zero sub-blocks included (scale-0 paths)
    sub = rng.choice(np.array([0.0, 1e-4, 1.0, 50.0], np.float32), (13, 32, 1))
    x[11:] = (x[11:].reshape(13, 32, 16) * sub).reshape(13, 512)
    return {"normal": normal, "scaled": scaled, "extreme": x}


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


def _importances(rng: np.random.Generator, k: int) -> dict[str, np.ndarray]:
    lognormal = np.exp(rng.standard_normal(k) * 1.5).astype(np.float32)  # imatrix-like spread
    sparse = lognormal.copy()
    sparse[rng.random(k) < 0.3] = 0.0  # dead columns: zero weight
    sparse[:16] = 0.0  # a whole sub-block with no weight
    return {"lognormal": lognormal, "sparse": sparse, "flat": np.ones(k, np.float32)}


def test_registry_has_the_k_quants() -> None:
    assert K_QUANTS == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    for name in K_QUANTS:
        codec = REGISTRY[name]
        assert codec.block_size == 256 and codec.supports_importance and not codec.is_float


@pytest.mark.parametrize("name", K_QUANTS)
def test_encode_matches_ggml_reference(name: str, ggml_quantize: GgmlQuantize) -> None:
    codec = REGISTRY[name]
    for label, x in _cases(np.random.default_rng(20)).items():
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
    for label, x in _cases(rng).items():
        for ilabel, imp in _importances(rng, x.shape[1]).items():
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
    imp = _importances(np.random.default_rng(25), x.shape[1])["lognormal"]
    ours = codec.encode(x, imp)
    _assert_agrees(codec, x, ggml_quantize(codec, x, imp), "down_proj", imp)
    # the importance changes the bytes: it is not ignored
    assert not np.array_equal(ours, codec.encode(x))


def _random_bytes(codec: type[Codec], n: int, rng: np.random.Generator) -> np.ndarray:
    raw = rng.integers(0, 256, size=(n, codec.type_size), dtype=np.uint8)
    hi = raw.reshape(-1)[1::2]  # every f16 field sits at an even offset: keep them finite
    hi[(hi & 0x7C) == 0x7C] &= 0xBF
    return raw


@pytest.mark.parametrize("name", K_QUANTS)
def test_decode_equals_gguf_dequantize(name: str, ggml_quantize: GgmlQuantize) -> None:
    codec = REGISTRY[name]
    rng = np.random.default_rng(21)
    x = _cases(rng)["extreme"]
    for label, data in {
        "ggml bytes": ggml_quantize(codec, x),
        "random bytes": _random_bytes(codec, 48, rng).reshape(24, -1),
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
