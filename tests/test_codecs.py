"""Codecs against gguf-py's reference quantizers (which mirror llama.cpp's `quantize_row_*_ref`)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants

from llmq.codecs import REGISTRY, GroupCodec, get_codec
from llmq.errors import FormatError

CODECS = sorted(REGISTRY)
GROUPED = sorted(n for n, c in REGISTRY.items() if issubclass(c, GroupCodec))
# gguf-py has no quantizer for these; tests/test_kquants.py compares their bytes with libggml's
K_QUANTS = sorted(n for n in REGISTRY if n.endswith("_K"))
GGUF_QUANTIZABLE = sorted(n for n in CODECS if n not in K_QUANTS)


def _cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    normal = rng.standard_normal((48, 256)).astype(np.float32)
    extreme = normal.copy()
    extreme[0] = 0.0  # all-zero blocks: d = 0
    extreme[1, :32] = 3.0  # constant block
    extreme[2] *= 1e-7  # subnormal-range scales in f16
    extreme[3] *= 1.5e4  # scales and mins near the f16 maximum
    extreme[4, ::2] = -extreme[4, 1::2]  # ties in |max| with opposite signs
    extreme[5, 7] = 50.0  # one outlier
    return {
        "normal": normal,
        "extreme": extreme,
        "halves": (rng.integers(-16, 16, (8, 64)) / 2).astype(np.float32),
    }


@pytest.mark.parametrize("name", GGUF_QUANTIZABLE)
def test_encode_is_byte_identical_to_gguf_reference(name: str) -> None:
    codec = REGISTRY[name]
    for label, x in _cases(np.random.default_rng(0)).items():
        ours = codec.encode(x)
        ref = np.asarray(quants.quantize(x, codec.qtype)).view(np.uint8).reshape(ours.shape)
        assert np.array_equal(ours, ref), f"{name} differs from gguf-py on {label} input"


@pytest.mark.parametrize("name", CODECS)
def test_decode_equals_gguf_dequantize(name: str) -> None:
    codec = REGISTRY[name]
    x = _cases(np.random.default_rng(1))["extreme"]
    data = codec.encode(x)
    ours = codec.decode(data, x.shape)
    ref = quants.dequantize(data, codec.qtype).reshape(x.shape)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_error_bound(name: str) -> None:
    codec = REGISTRY[name]
    x = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32)  # whole K-quant blocks
    err = np.abs(codec.decode(codec.encode(x), x.shape) - x)
    if codec.is_float:
        assert err.max() <= np.abs(x).max() * 2.0**-7  # bf16 has 8 significant bits
    else:
        blocks = x.reshape(-1, codec.block_size)
        amax = np.abs(blocks).max(axis=1)
        if codec.symmetric:  # levels -2^(b-1) .. 2^(b-1)-1: the side opposite the max may clamp one step
            bound = amax / 2 ** (codec.bits - 1)
        else:
            bound = 0.5 * (blocks.max(axis=1) - blocks.min(axis=1)) / (2**codec.bits - 1)
            if name in K_QUANTS:  # quantized sub-block scales/mins, and a search that may clip: a full step
                bound = 2 * bound
        bound = bound + amax * 2e-3 + 1e-6  # f16 rounding of d (and m)
        assert (err.reshape(-1, codec.block_size).max(axis=1) <= bound).all()


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("group", [64, 128, 256, -1])
def test_grouped_blocks_share_parameters_and_match_group_rtn(name: str, group: int) -> None:
    codec = REGISTRY[name]
    x = np.random.default_rng(3).standard_normal((6, 576)).astype(np.float32)  # 576 = 4*128 + 64
    data = codec.encode_grouped(x, group)
    blocks = data.reshape(6, -1, codec.type_size)
    header = 4 if not codec.symmetric else 2  # d (and m) lead every legacy block
    g = 576 if group == -1 else group
    starts = list(range(0, 576, g))
    for row in range(6):
        for s in starts:
            e = min(s + g, 576)
            params = blocks[row, s // 32 : e // 32, :header]
            assert (params == params[0]).all(), "blocks of one group must carry the same scale"
            # the group's values are exactly llama.cpp's RTN of the group taken as one wide block
            d, m = codec.group_params(x[row : row + 1, s:e])
            ref = codec.pack(
                x[row, s:e].reshape(-1, 32), np.repeat(d, (e - s) // 32, 0), np.repeat(m, (e - s) // 32, 0)
            )
            assert np.array_equal(blocks[row, s // 32 : e // 32], ref)
    # decoding needs nothing but the standard block decoder
    np.testing.assert_array_equal(
        codec.decode(data, x.shape), quants.dequantize(data, codec.qtype).reshape(x.shape)
    )


def test_group_equal_to_block_is_plain_encoding() -> None:
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    for name in GROUPED:
        assert np.array_equal(REGISTRY[name].encode_grouped(x, 32), REGISTRY[name].encode(x))


def test_shape_errors_name_the_problem() -> None:
    with pytest.raises(FormatError, match="blocks of 32"):
        get_codec("Q4_0").encode(np.zeros((2, 48), np.float32))
    with pytest.raises(FormatError, match="group size 48"):
        get_codec("Q4_1").encode_grouped(np.zeros((2, 96), np.float32), 48)
    with pytest.raises(FormatError, match="unknown tensor type"):
        get_codec("Q9_9")


def test_registry_declares_geometry_from_gguf() -> None:
    from gguf import GGML_QUANT_SIZES

    for name, codec in REGISTRY.items():
        assert (codec.block_size, codec.type_size) == GGML_QUANT_SIZES[codec.qtype]
        assert codec.name == name


@pytest.mark.parametrize("shape", [(33, 1), (128, 2), (128, 2048), (40, 3, 5), (7, 1, 1)])
def test_seq_sum_adds_term_by_term_as_c(shape: tuple[int, ...]) -> None:
    """`seq_sum` equals a C loop's float32 accumulation bit for bit (NumPy's reduce where it is the same)."""
    import torch

    from llmq.codecs.quants_math import seq_sum

    rng = np.random.default_rng(0)
    t = (rng.standard_normal(shape) * np.exp(4 * rng.standard_normal(shape))).astype(np.float32)
    acc = np.zeros(shape[1:], np.float32)
    for row in t:  # float s = 0; s += t[i]
        acc = (acc + row).astype(np.float32)
    assert np.array_equal(seq_sum(t).view(np.uint32), acc.view(np.uint32))
    assert np.array_equal(seq_sum(torch.from_numpy(t)).numpy().view(np.uint32), acc.view(np.uint32))
