"""The fast CPU encoders (libggml's own, or the compiled searches where those are faster) as the production
path: the bytes of llmq's NumPy reference encoders, for every quantized type, with and without importance,
whole tensors and slabs in parallel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kquant_cases import cases, importances

from llmq.codecs import REGISTRY, ggml
from llmq.encoding import EncoderConfig, Target, encode_tensor
from llmq.plan import TensorPlan

QUANTIZED = sorted(n for n, c in REGISTRY.items() if not c.is_float)


def test_libggml_is_found() -> None:
    # llama-cpp-python is a test dependency and ships libggml
    assert ggml.quantize_chunk() is not None


@pytest.mark.parametrize("name", QUANTIZED)
def test_same_bytes_as_the_reference(name: str) -> None:
    codec = REGISTRY[name]
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 512)) * rng.lognormal(size=(64, 1))).astype(np.float32)
    w[3, :40] = 0.0  # an all-zero block
    w[5, 7] = 30.0  # an outlier
    imp = rng.lognormal(size=512).astype(np.float32)
    target = Target(name, codec.block_size)
    for weighted in (False, True):  # one fast CPU path per type and use
        assert target.uses_libggml(weighted) != target.uses_compiled(weighted)
    for importance in (None, imp):
        want = codec.encode(w, importance)  # llmq's NumPy reference (its compiled search, if any)
        np.testing.assert_array_equal(target.encode(w, importance), want)
        theirs = ggml.encode(
            int(codec.qtype), w, codec.nbytes(w.shape), importance if codec.supports_importance else None
        )
        np.testing.assert_array_equal(theirs.reshape(want.shape), want)


@pytest.mark.parametrize("name", QUANTIZED)
def test_compiled_searches_give_the_array_versions_bytes(name: str) -> None:
    """The compiled searches (`qkx_jit`) against the array versions they replace on NumPy inputs, and
    against libggml where they replace it (`Codec.compiled_faster`), on the K-quant edge cases, with
    and without importance."""
    import llmq.codecs.quants_math as qm

    codec = REGISTRY[name]
    rng = np.random.default_rng(7)
    for x in cases(rng).values():
        for imp in [None, *importances(rng, x.shape[1]).values()]:
            compiled = codec.encode(x, imp)
            if codec.compiled_faster[imp is not None and codec.supports_importance]:
                theirs = ggml.encode(int(codec.qtype), x, codec.nbytes(x.shape), imp)
                np.testing.assert_array_equal(theirs.reshape(compiled.shape), compiled)
            qm.COMPILED = False
            try:
                np.testing.assert_array_equal(codec.encode(x, imp), compiled)
            finally:
                qm.COMPILED = True


def test_slabs_in_parallel_equal_one_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    import llmq.encoding

    monkeypatch.setattr(llmq.encoding, "CHUNK_VALUES", 512 * 8)  # 8 rows per slab: many slabs
    monkeypatch.setattr(llmq.encoding, "ENCODE_THREADS", 2)
    w = torch.randn(100, 512)
    plan = TensorPlan("blk.0.ffn_down.weight", "x", (100, 512), "Q4_K", 256, 0, "linear")
    got = encode_tensor(plan, w, encoder=EncoderConfig())
    np.testing.assert_array_equal(got, REGISTRY["Q4_K"].encode(w.numpy()))
    # a bfloat16 tensor: each thread converts its slabs in one reused buffer
    wb = w.to(torch.bfloat16)
    np.testing.assert_array_equal(
        encode_tensor(plan, wb, encoder=EncoderConfig()), REGISTRY["Q4_K"].encode(wb.float().numpy())
    )


def test_refined_and_fed_back_encodes_start_from_the_fast_path_with_the_same_bytes() -> None:
    from llmq.gptq import encode_feedback, feedback_factor

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 512, generator=gen) * torch.linspace(0.2, 4, 512)
    factor = feedback_factor((x.T @ x / 400).numpy())
    w = torch.randn(24, 512, generator=gen).numpy()
    imp = (x**2).mean(0).numpy()
    for name in ("Q4_K", "Q5_K", "Q6_K"):
        codec = REGISTRY[name]
        target = Target(name, 256, EncoderConfig(refine=True, feedback=True))
        assert target.fast_cpu()
        np.testing.assert_array_equal(target.encode(w, imp), codec.encode(w, imp, refine=True))
        want = encode_feedback(codec, w, factor, imp, refine=True)  # its own NumPy first encoding
        np.testing.assert_array_equal(target.encode(w, imp, factor), want)


def test_float_and_disabling_keep_the_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not Target("F16", 1).uses_libggml()
    monkeypatch.setenv(ggml.ENV, "0")
    ggml.quantize_chunk.cache_clear()
    try:
        assert not Target("Q6_K", 256).uses_libggml()
    finally:
        monkeypatch.delenv(ggml.ENV)
        ggml.quantize_chunk.cache_clear()
