"""Reference kernels: exact decode against gguf-py, tiled matmul, tile-bounded memory, and errors.

Every test loops over ``llmq.kernels.FORMATS``, so a newly registered format is covered without
edits here (a non-GGUF format needs a packer in ``_PACKERS``/``_RANDOM``; a test fails until it has one).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from llmq.kernels import FORMATS, AWQPacked, GGUFBlockFormat, dequantize, matmul, pack_awq, row_slice

from llmq.codecs import get_codec
from llmq.errors import FormatError

ALL = list(FORMATS)
GGUF = [name for name, f in FORMATS.items() if isinstance(f, GGUFBlockFormat)]
N, K = 40, 256  # N is a multiple of 8 (AWQ) but not of the odd tile sizes below
AWQ_GROUP = 64


def _f16_safe(raw: np.ndarray) -> np.ndarray:
    # GGUF stores every f16 field at an even byte offset; clearing one exponent bit of each odd byte
    # whose f16 would be inf/nan keeps all scales finite while the rest of the bytes stay random.
    hi = raw.reshape(-1)[1::2]
    hi[(hi & 0x7C) == 0x7C] &= 0xBF
    return raw


def _random_awq(n: int, k: int, rng: np.random.Generator) -> AWQPacked:
    def words(rows: int) -> np.ndarray:
        return rng.integers(-(2**31), 2**31, size=(rows, n // 8), dtype=np.int64).astype(np.int32)

    bits = _f16_safe(rng.integers(0, 256, size=(k // AWQ_GROUP, 2 * n), dtype=np.uint8))
    return AWQPacked(words(k), words(k // AWQ_GROUP), bits.view(np.float16), AWQ_GROUP)


# Formats outside GGUF: how to quantize a float weight, and how to make random valid packed data.
_PACKERS: dict[str, Callable[[np.ndarray], Any]] = {"AWQ_INT4": lambda w: pack_awq(w, AWQ_GROUP)}
_RANDOM: dict[str, Callable[[int, int, np.random.Generator], Any]] = {"AWQ_INT4": _random_awq}


def quantized(name: str, w: np.ndarray) -> Any:
    """Packed data for float weight ``w`` (gguf-py's quantizer for GGUF types), as raw bytes.

    gguf-py cannot quantize the K-quants; llmq's codec (byte-checked against libggml in
    tests/test_kquants.py) makes their bytes.
    """
    if name in GGUF:
        try:
            data = quants.quantize(w, GGMLQuantizationType[name])
        except NotImplementedError:
            data = get_codec(name).encode(w)
        return np.ascontiguousarray(data).view(np.uint8)
    assert name in _PACKERS, f"add a packer for the new kernel format {name} to tests/test_kernels.py"
    return _PACKERS[name](w)


def random_packed(name: str, n: int, k: int, rng: np.random.Generator) -> Any:
    """Random valid packed data (finite f16 scales, all other bits random)."""
    f = FORMATS[name]
    if isinstance(f, GGUFBlockFormat):
        return _f16_safe(rng.integers(0, 256, size=(n, f.row_bytes(k)), dtype=np.uint8))
    assert name in _RANDOM, (
        f"add a random-data maker for the new kernel format {name} to tests/test_kernels.py"
    )
    return _RANDOM[name](n, k, rng)


def weights(case: str, rng: np.random.Generator, n: int = N, k: int = K) -> np.ndarray:
    w = rng.standard_normal((n, k)).astype(np.float32)
    if case == "zeros":
        return np.zeros_like(w)
    if case == "tiny":
        return w * np.float32(1e-7)  # f16 scales in the subnormal range (or flushed to 0)
    if case == "huge":
        return w * np.float32(1e4)  # scales and mins near the f16 maximum
    if case == "mixed":  # every 32-value block scaled independently, zero blocks included
        scale = rng.choice(np.array([0.0, 1e-7, 1.0, 1e4], dtype=np.float32), size=(n, k // 32, 1))
        return (w.reshape(n, k // 32, 32) * scale).reshape(n, k)
    return w


def assert_bits_equal(got: np.ndarray, want: np.ndarray, label: str) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape, (label, got.dtype, got.shape, want.shape)
    # Bitwise, so -0.0 and NaN payloads must match too.
    diff = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
    assert diff.size == 0, f"{label}: {diff.size} values differ, first at {diff[0]}"


def naive_awq(p: AWQPacked) -> np.ndarray:
    """Decode AutoAWQ's GEMM layout one element at a time, straight from its definition."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an int32 holds output column 8j + order[i]
    qw, qz = p.qweight.view(np.uint32), p.qzeros.view(np.uint32)
    k, n = qw.shape[0], qw.shape[1] * 8
    out = np.empty((n, k), dtype=np.float32)
    for col in range(n):
        j, shift = col // 8, 4 * order.index(col % 8)
        for row in range(k):
            g = row // p.group_size
            q = (int(qw[row, j]) >> shift) & 0xF
            z = (int(qz[g, j]) >> shift) & 0xF
            out[col, row] = np.float32(q - z) * np.float32(p.scales[g, col])
    return out


# -- decode ------------------------------------------------------------------------------------


def test_registry_has_the_issue_formats() -> None:
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32", "AWQ_INT4"} <= set(FORMATS)


@pytest.mark.parametrize("case", ["normal", "zeros", "tiny", "huge", "mixed"])
@pytest.mark.parametrize("name", GGUF)
def test_decode_equals_gguf_on_quantized_data(name: str, case: str) -> None:
    packed = quantized(name, weights(case, np.random.default_rng(1)))
    want = quants.dequantize(packed, GGMLQuantizationType[name]).reshape(N, K)
    assert_bits_equal(dequantize(packed, name, (N, K)), want, f"{name}/{case}")


@pytest.mark.parametrize("name", GGUF)
def test_decode_equals_gguf_on_random_bytes(name: str) -> None:
    packed = random_packed(name, N, K, np.random.default_rng(2))
    want = quants.dequantize(packed, GGMLQuantizationType[name]).reshape(N, K)
    assert_bits_equal(dequantize(packed, name, (N, K)), want, f"{name}/random bytes")


@pytest.mark.parametrize("name", GGUF)
def test_decode_takes_what_gguf_reader_returns(name: str, tmp_path: Path) -> None:
    # GGUFReader gives memmaps: (N, bytes_per_row) uint8 for quants, float16/float32 for F16/F32.
    qtype = GGMLQuantizationType[name]
    packed = quantized(name, weights("normal", np.random.default_rng(3)))
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    writer.add_tensor("w", packed, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(tmp_path / "t.gguf").tensors[0]
    assert tensor.tensor_type == qtype
    want = quants.dequantize(np.asarray(tensor.data), qtype).reshape(N, K)
    assert_bits_equal(dequantize(tensor.data, name, (N, K)), want, f"{name}/GGUFReader data")


def test_awq_decode_equals_naive_unpack() -> None:
    rng = np.random.default_rng(4)
    for label, packed in {
        "random words": _random_awq(16, 128, rng),
        "pack_awq": pack_awq(weights("normal", rng, 16, 128), AWQ_GROUP),
    }.items():
        assert_bits_equal(dequantize(packed, "AWQ_INT4", (16, 128)), naive_awq(packed), label)


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_pack_round_trip_within_half_a_step(group_size: int) -> None:
    w = weights("normal", np.random.default_rng(5), 64, 256)
    p = pack_awq(w, group_size)
    assert p.qweight.dtype == np.int32 and p.qweight.shape == (256, 8)
    assert p.scales.dtype == np.float16 and p.scales.shape == (256 // group_size, 64)
    back = dequantize(p, "AWQ_INT4", (64, 256))
    step = np.repeat(p.scales.astype(np.float32).T, group_size, axis=1)  # (N, K): s of each weight
    # Half a step; the float16 scale may be 2**-11 short of range / 15, which can push a group's
    # maximum one code past the top and add that slack over 15 steps.
    assert (np.abs(back - w) <= step * (0.5 + 15 * 2.0**-11) + 1e-7).all()
    # The same values AutoAWQ's pseudo-quantizer computes from this scale and zero point.
    zeros = np.clip(-np.round(w.reshape(64, -1, group_size).min(-1) / p.scales.T.astype(np.float32)), 0, 15)
    z = np.repeat(zeros, group_size, axis=1)
    assert np.array_equal(back, (np.clip(np.round(w / step) + z, 0, 15) - z) * step)


# -- matmul ------------------------------------------------------------------------------------


def _check_matmul(name: str, x: np.ndarray, tile_rows: int | None = None) -> None:
    packed = quantized(name, weights("normal", np.random.default_rng(6)))
    kwargs = {} if tile_rows is None else {"tile_rows": tile_rows}
    got = matmul(x, packed, name, (N, K), **kwargs)
    want = x @ dequantize(packed, name, (N, K)).T
    assert got.dtype == np.float32 and got.shape == (*x.shape[:-1], N)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("name", ALL)
def test_matmul_equals_dequantized_matmul(name: str, batch: int) -> None:
    _check_matmul(name, np.random.default_rng(7).standard_normal((batch, K)).astype(np.float32))


@pytest.mark.parametrize("tile_rows", [1, 7, N + 5])
@pytest.mark.parametrize("name", ALL)
def test_matmul_any_tile_size(name: str, tile_rows: int) -> None:
    _check_matmul(name, np.random.default_rng(8).standard_normal((3, K)).astype(np.float32), tile_rows)


@pytest.mark.parametrize("name", ALL)
def test_matmul_3d_and_1d_x(name: str) -> None:
    rng = np.random.default_rng(9)
    _check_matmul(name, rng.standard_normal((2, 3, K)).astype(np.float32), tile_rows=16)
    _check_matmul(name, rng.standard_normal(K).astype(np.float32))


@pytest.mark.parametrize("name", ALL)
def test_matmul_layout_is_a_permutation_of_dequantize(name: str) -> None:
    # decode_for_matmul may reorder features (x_order) and outputs (y_order), never change a value.
    f = FORMATS[name]
    packed = random_packed(name, N, K, np.random.default_rng(16))
    want = dequantize(packed, name, (N, K))
    buf = np.empty((K, N) if f.k_major else (N, K), dtype=np.float32)
    f.decode_for_matmul(f.prepare(packed, (N, K)), buf)
    got = np.ascontiguousarray(buf.T if f.k_major else buf)
    x_order, y_order = f.x_order(K), f.y_order(N)
    if y_order is not None:
        assert sorted(y_order) == list(range(N))
        want = want[y_order]
    if x_order is not None:
        assert sorted(x_order) == list(range(K))
        want = want[:, x_order]
    assert_bits_equal(got, np.ascontiguousarray(want), f"{name} matmul layout")


def _matmul_peak(x: np.ndarray, packed: Any, name: str, shape: tuple[int, int], tile_rows: int) -> int:
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        matmul(x, packed, name, shape, tile_rows=tile_rows)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ALL)
def test_matmul_memory_is_bounded_by_the_tile(name: str) -> None:
    n, k = 1024, 2048
    packed = random_packed(name, n, k, np.random.default_rng(10))
    x = np.ones((1, k), dtype=np.float32)
    small, large = (_matmul_peak(x, packed, name, (n, k), t) for t in (16, 64))
    half = row_slice(packed, name, (n, k), 0, n // 2)
    small_half_n = _matmul_peak(x, half, name, (n // 2, k), 16)
    tile_bytes = 16 * k * 4
    assert large < n * k * 4 // 4, f"{name}: peak {large} B is not tile-bounded"
    assert large - small >= 2.5 * tile_bytes, (
        f"{name}: peak {small} -> {large} B does not grow with tile_rows"
    )
    assert small <= 2 * tile_bytes + n * 4 + 65536, f"{name}: peak {small} B for a {tile_bytes} B tile"
    assert abs(small - small_half_n) <= n * 4 + 4096, f"{name}: peak depends on N ({small_half_n} -> {small})"


# -- row_slice ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_row_slice_decodes_to_the_same_rows(name: str) -> None:
    packed = random_packed(name, N, K, np.random.default_rng(11))
    full = dequantize(packed, name, (N, K))
    part = row_slice(packed, name, (N, K), 8, 24)
    assert_bits_equal(dequantize(part, name, (16, K)), full[8:24], f"{name} rows 8:24")
    with pytest.raises(FormatError, match="outside"):
        row_slice(packed, name, (N, K), 8, N + 8)
    if FORMATS[name].row_align > 1:
        with pytest.raises(FormatError, match="multiples of 8"):
            row_slice(packed, name, (N, K), 3, 24)


# -- errors ------------------------------------------------------------------------------------


def test_unknown_format() -> None:
    with pytest.raises(FormatError, match="unknown kernel format 'Q3_Z'"):
        dequantize(np.zeros(10, np.uint8), "Q3_Z", (1, 32))


@pytest.mark.parametrize("name", GGUF)
def test_wrong_byte_count(name: str) -> None:
    packed = random_packed(name, N, K, np.random.default_rng(12))
    with pytest.raises(FormatError, match=rf"{name}: packed data of \d+ bytes .* does not hold"):
        dequantize(packed.reshape(-1)[:-2], name, (N, K))
    with pytest.raises(FormatError, match=f"{name}: packed data must be"):
        matmul(np.ones(K, np.float32), packed.astype(np.int64), name, (N, K))


def test_awq_wrong_shapes() -> None:
    p = _random_awq(N, K, np.random.default_rng(13))
    with pytest.raises(FormatError, match="AWQ_INT4: qweight must be int32 of shape"):
        dequantize(p, "AWQ_INT4", (N, K + 64))
    with pytest.raises(FormatError, match="AWQ_INT4: N=12 .* not a multiple of 8"):
        pack_awq(np.ones((12, 64), np.float32), 32)
    with pytest.raises(FormatError, match="must be an AWQPacked"):
        dequantize(np.zeros(4, np.uint8), "AWQ_INT4", (8, 32))


def _k_block(name: str) -> int:
    # The K granularity: GGUF block size, or the AWQ group size the test data uses.
    f = FORMATS[name]
    return f.block_size if isinstance(f, GGUFBlockFormat) else AWQ_GROUP


@pytest.mark.parametrize("name", [name for name in ALL if _k_block(name) > 1])
def test_k_not_a_multiple_of_the_block(name: str) -> None:
    block = _k_block(name)
    with pytest.raises(FormatError, match=f"{name}: K={block + 1} .* not a multiple of the .*{block}"):
        dequantize(random_packed(name, N, K, np.random.default_rng(14)), name, (N, block + 1))


@pytest.mark.parametrize("name", ALL)
def test_bad_x_or_tile(name: str) -> None:
    packed = random_packed(name, N, K, np.random.default_rng(15))
    with pytest.raises(FormatError, match=rf"x of shape \(2, {K + 1}\) does not end in K={K}"):
        matmul(np.ones((2, K + 1), np.float32), packed, name, (N, K))
    with pytest.raises(FormatError, match="tile_rows must be >= 1"):
        matmul(np.ones((2, K), np.float32), packed, name, (N, K), tile_rows=0)


def test_round_activations_is_llama_cpp_q8_rounding() -> None:
    """8-bit activation rounding equals a Q8_0 round trip through gguf-py (llama.cpp's reference
    quantize_row_q8_0) except at exact ties; F16 weights round activations to f16; F32 leaves them."""
    from llmq.kernels import VEC_DOT_TYPE, round_activations

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 30, (64, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    ref = gguf.quants.dequantize(
        gguf.quants.quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    )
    for fmt in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        assert VEC_DOT_TYPE[fmt] in ("Q8_0", "Q8_1")
        got = round_activations(x, fmt)
        assert got.dtype == np.float32 and got.shape == x.shape
        assert np.mean(got == ref) > 0.999
        np.testing.assert_allclose(got, ref, atol=np.abs(x).max() / 127 + 1e-6)
    np.testing.assert_array_equal(round_activations(x, "F16"), x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(round_activations(x, "F32"), x)
    with pytest.raises(FormatError, match="blocks of 32"):
        round_activations(x[:, :40], "Q4_0")


def test_round_activations_q8_k_for_k_quants() -> None:
    """K-quant weights take Q8_K activations: blocks of 256, the signed max maps to -127, f32 scale."""
    from llmq.kernels import round_activations

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 512)) * rng.uniform(0.1, 10, (8, 1))).astype(np.float32)
    x[1, :256] = 0.0
    blocks = x.reshape(-1, 256)
    mx = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
    with np.errstate(divide="ignore"):
        d = np.where(mx != 0, 1 / (np.float32(-127) / mx), 0).astype(np.float32)[:, None]
    for fmt in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        got = round_activations(x, fmt).reshape(-1, 256)
        q = np.divide(got, d, out=np.zeros_like(got), where=d != 0)
        np.testing.assert_allclose(q, np.rint(q), atol=1e-3)  # integer multiples of the block scale
        assert (np.abs(q) <= 127.001).all() and np.all(got[2] == 0) == np.all(blocks[2] == 0)
        assert (np.abs(got - blocks) <= np.abs(d) / 2 + 1e-6).all()
    with pytest.raises(FormatError, match="blocks of 256"):
        round_activations(x[:, :288], "Q4_K")
