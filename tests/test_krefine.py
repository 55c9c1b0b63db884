"""K-quant refinement (`llmq.codecs.krefine`, ``--awq-refine``): valid bytes that gguf decodes as we do,
never a higher weighted error than llama.cpp's encoder block by block, and wired through convert."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import convert_awq_pair

from llmq.codecs import REGISTRY, Codec

REFINED = sorted(
    n for n, c in REGISTRY.items() if c.refine_blocks.__func__ is not Codec.refine_blocks.__func__
)


def _grid_rows(rows: int, k: int, seed: int) -> np.ndarray:
    """Rows on a Q4_1-like grid (16 levels per 32 values), as SmolLM2's plain reference holds them."""
    gen = np.random.default_rng(seed)
    d = gen.uniform(0.002, 0.02, (rows, k // 32, 1))
    m = -8 * d + gen.normal(0, 0.002, (rows, k // 32, 1))
    q = gen.integers(0, 16, (rows, k // 32, 32))
    return (d * q + m).reshape(rows, k).astype(np.float16).astype(np.float32)


def test_the_refined_types() -> None:
    assert REFINED == ["Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("name", REFINED)
@pytest.mark.parametrize("data", ["gaussian", "grid"])
def test_refinement_never_raises_a_blocks_weighted_error(name: str, data: str) -> None:
    codec = REGISTRY[name]
    gen = np.random.default_rng(1)
    k = 512
    x = _grid_rows(16, k, 2) if data == "grid" else gen.standard_normal((16, k)).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero super-block stays all zero bytes
    imp = gen.uniform(0.01, 4.0, k).astype(np.float32) ** 2
    for importance in (imp, None):
        ref = codec.encode(x, importance)
        out = codec.encode(x, importance, refine=True)
        assert out.shape == ref.shape and out.dtype == np.uint8
        y = codec.decode(out, x.shape)
        # the bytes are the format's: gguf's dequantizer reads them as our decoder does
        np.testing.assert_array_equal(gguf.quants.dequantize(out, codec.qtype).reshape(x.shape), y)
        w = np.ones(k, np.float32) if importance is None else importance
        before, after = ((w * (x - v) ** 2).reshape(-1, 256).sum(1) for v in (codec.decode(ref, x.shape), y))
        assert np.all(after <= before * (1 + 1e-6) + 1e-12)
        assert after.sum() < 0.995 * before.sum()  # and it does find better scales
        assert not out[0, : codec.type_size].any()


def test_refinement_applies_only_where_a_type_has_it() -> None:
    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    imp = np.ones(256, np.float32)
    for name in ("Q3_K", "Q8_0", "Q4_0"):
        codec = REGISTRY[name]
        np.testing.assert_array_equal(codec.encode(x, imp, refine=True), codec.encode(x, imp))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("name", REFINED)
def test_refinement_of_tensors_gives_the_numpy_bytes(name: str, device: str) -> None:
    """Refinement runs on the tensor's device (a GPU's, in a `--device cuda` run): same choices, same bytes."""
    codec = REGISTRY[name]
    gen = np.random.default_rng(4)
    x = np.concatenate([_grid_rows(24, 512, 5), gen.standard_normal((24, 512)).astype(np.float32)])
    x[0, :256] = 0.0
    imp = gen.uniform(0.01, 4.0, 512).astype(np.float32) ** 2
    for importance in (imp, None):
        want = codec.encode(x, importance, refine=True)
        assert not np.array_equal(want, codec.encode(x, importance))  # the refinement moved something
        got = codec.encode(torch.from_numpy(x).to(device), importance, refine=True)
        assert isinstance(got, torch.Tensor) and got.device.type == device
        np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_awq_refine_through_the_cli(tmp_path: Path) -> None:
    words, tensors, report = convert_awq_pair(tmp_path, "refine")
    assert words[True]["refine"] == "on"
    assert "refine" not in words[False]
    assert report["encoder"]["refine"] is True
    changed = 0
    for name, t in tensors[True].items():
        other = tensors[False][name]
        assert t.tensor_type == other.tensor_type  # the same mix, type for type
        if t.tensor_type.name in REFINED:
            changed += t.data.tobytes() != other.data.tobytes()
    assert changed > 0


@pytest.mark.parametrize("name", REFINED)
def test_the_compiled_search_gives_the_array_versions_bytes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NumPy inputs take `krefine_jit`'s per-sub-block descent: byte for byte the array version's choices,
    on grid rows, Gaussian rows with outliers, tiny and huge scales, and zero super-blocks."""
    from llmq.codecs import krefine

    codec = REGISTRY[name]
    gen = np.random.default_rng(6)
    x = np.concatenate(
        [
            _grid_rows(32, 1024, 7),
            gen.standard_normal((32, 1024)).astype(np.float32)
            * gen.uniform(1e-6, 1e3, (32, 1)).astype(np.float32),
        ]
    )
    x[:, ::61] *= 40  # outliers, so some sub-blocks' neighbours clamp
    x[1, :256] = 0.0
    x[2, 256:512] = 1e-30  # scales that round to zero in f16
    imp = gen.uniform(0.01, 4.0, 1024).astype(np.float32) ** 2
    for importance in (imp, None):
        data = codec.encode(x, importance)
        monkeypatch.setattr(krefine, "COMPILED", False)
        want = codec.refine(x, importance, data)
        monkeypatch.setattr(krefine, "COMPILED", True)
        got = codec.refine(x, importance, data)
        assert not np.array_equal(want.reshape(-1), data.reshape(-1))  # the search moved something
        np.testing.assert_array_equal(got, want)
