"""Calibration windows and the layer-by-layer activation flow that the AWQ search runs on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_tiny, make_tiny_llama

import llmq
from llmq.activations import ActivationStore, LayerRunner, capture_inputs, embed
from llmq.arch import registered
from llmq.calib import CalibConfig, calibration_tokens, read_texts, windows
from llmq.errors import LlmqError, SourceError


def test_streamed_layers_reproduce_the_full_model(tmp_path: Path) -> None:
    """Embedding -> each decoder layer on its own (one resident at a time) -> final norm = HF hidden state."""
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_llama(tmp_path / "m", n_layers=3, dtype=torch.float32)
    ckpt = llmq.Checkpoint(model_dir)
    arch = llmq.get_arch(ckpt.config)
    stream = llmq.LayerStream(ckpt, arch)
    runner = LayerRunner(ckpt.config, arch)
    tokens = torch.randint(0, ckpt.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    store = ActivationStore(3, 24, ckpt.config.hidden_size, batch_size=2, directory=str(tmp_path))
    emb = ckpt.get(arch.embed)
    for i in range(len(store)):
        store.write(i, embed(tokens[i * 2 : i * 2 + 2], emb))
    for _, layer in stream:
        for i in range(len(store)):
            store.write(i, runner(layer, store.read(i)))
    ours = torch.cat(list(store))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True).hidden_states[-1]  # after the final norm
        ours = hf.model.norm(ours)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(registered()))
def test_a_capture_whose_output_is_not_kept_stops_after_the_last_input(family: str, tmp_path: Path) -> None:
    """`capture_inputs` with ``write_outputs=False`` records the same statistics bit for bit, leaves the
    windows as they were and, in a dense layer, never runs its last linear (the forward stops at that
    linear's input)."""
    model_dir = make_tiny(family, tmp_path / "m", n_layers=1, dtype=torch.float32)
    ckpt = llmq.Checkpoint(model_dir)
    arch = llmq.get_arch(ckpt.config)
    layer = next(iter(llmq.LayerStream(ckpt, arch)))[1]
    runner = LayerRunner(ckpt.config, arch)
    x = torch.randn(4, 16, ckpt.config.hidden_size, generator=torch.Generator().manual_seed(2))
    last = layer.get_submodule(arch.capture_modules[-1])
    calls = []
    last.register_forward_hook(lambda *_: calls.append(1))
    stats, outs = [], []
    for write in (True, False):
        store = ActivationStore(4, 16, ckpt.config.hidden_size, batch_size=2, directory=str(tmp_path))
        for i in range(len(store)):
            store.write(i, x[2 * i : 2 * i + 2])
        calls.clear()
        stats.append(
            capture_inputs(
                layer, arch.capture_modules, store, runner, write_outputs=write, experts=arch.experts
            )
        )
        outs.append(torch.cat(list(store)))
        assert len(calls) == (2 if write or arch.experts is not None else 0)
    assert not torch.equal(outs[0], x) and torch.equal(outs[1], x)
    assert stats[0].keys() == stats[1].keys()
    for name, st in stats[0].items():
        assert st.n == stats[1][name].n
        assert torch.equal(st.gram, stats[1][name].gram), name
        assert torch.equal(st.abs_sum, stats[1][name].abs_sum), name


def test_a_bfloat16_forward_keeps_float32_statistics(tmp_path: Path) -> None:
    """`CalibConfig.forward_dtype` ``bfloat16``: the layer's products run under autocast (outputs
    within bfloat16's rounding of float32's, not equal), the Gram sums stay float32 products of
    what each linear reads, and the statistics agree to bfloat16's precision."""
    from llmq.activations import capture_inputs

    model_dir = make_tiny_llama(tmp_path / "m", n_layers=1, dtype=torch.float32)
    ckpt = llmq.Checkpoint(model_dir)
    arch = llmq.get_arch(ckpt.config)
    layer = next(iter(llmq.LayerStream(ckpt, arch)))[1]
    x = torch.randn(2, 16, ckpt.config.hidden_size, generator=torch.Generator().manual_seed(1))
    outs, stats = [], []
    for dtype in ("float32", "bfloat16"):
        runner = LayerRunner(ckpt.config, arch, forward_dtype=dtype)
        store = ActivationStore(2, 16, ckpt.config.hidden_size, batch_size=2, directory=str(tmp_path))
        store.write(0, x)
        stats.append(capture_inputs(layer, arch.capture_modules, store, runner, write_outputs=True))
        outs.append(store.read(0))
        assert outs[-1].dtype == torch.float32
    assert not torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1], outs[0], rtol=0.05, atol=0.05)
    for name in arch.capture_modules:
        g32, g16 = stats[0][name].gram, stats[1][name].gram
        assert g16.dtype == torch.float32
        torch.testing.assert_close(g16, g32, rtol=0.05, atol=0.05 * float(g32.abs().max()))
    q = stats[1]["self_attn.q_proj"]  # reads the norm's float32 output: the same Gram, bit for bit
    assert torch.equal(q.gram, stats[0]["self_attn.q_proj"].gram)
    with pytest.raises(LlmqError, match="forward_dtype"):
        CalibConfig("x", forward_dtype="float16")


@pytest.mark.parametrize("native", [False, True])
def test_auto_forward_dtype_is_bfloat16_where_the_cpu_has_it(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmq.activations import resolve_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == ("bfloat16" if native else "float32")
    assert resolve_dtype("float32", cpu) == "float32"
    assert resolve_dtype("bfloat16", cpu) == "bfloat16"


def test_store_round_trips_batches(tmp_path: Path) -> None:
    store = ActivationStore(5, 4, 3, batch_size=2, directory=str(tmp_path))
    data = torch.randn(5, 4, 3)
    for i in range(len(store)):
        store.write(i, data[i * 2 : i * 2 + 2])
    assert len(store) == 3
    torch.testing.assert_close(torch.cat(list(store)), data)
    store.close()


def test_windows_are_seeded_and_distinct() -> None:
    tokens = np.arange(10_000)
    cfg = CalibConfig("x", n_samples=16, seqlen=128, seed=3)
    a, b = windows(tokens, cfg), windows(tokens, cfg)
    assert torch.equal(a, b) and a.shape == (16, 128)
    starts = a[:, 0].tolist()
    assert len(set(starts)) == 16 and all(s % 128 == 0 for s in starts)  # non-overlapping slots
    assert not torch.equal(a, windows(tokens, CalibConfig("x", n_samples=16, seqlen=128, seed=4)))
    with pytest.raises(LlmqError, match="fewer than"):
        windows(np.arange(10), cfg)


def test_calibration_file_formats(tmp_path: Path) -> None:
    from tiny_models import make_tokenizer
    from transformers import AutoTokenizer

    make_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    plain = tmp_path / "c.txt"
    plain.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": f"Document {i}: the fox and the dog. " * 20}) for i in range(20))
    )
    assert read_texts(plain) == [plain.read_text()] and len(read_texts(jsonl)) == 20
    for path in (plain, jsonl):
        t = calibration_tokens(CalibConfig(str(path), n_samples=4, seqlen=32), tok)
        assert t.shape == (4, 32) and t.dtype == torch.int64
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(SourceError, match="bad.jsonl:1"):
        read_texts(bad)
    with pytest.raises(SourceError, match="not found"):
        read_texts(tmp_path / "nope.txt")
    with pytest.raises(LlmqError, match="sample from"):
        calibration_tokens(CalibConfig("self", n_samples=1, seqlen=8), tok)


def test_builtin_calibration_is_shipped_and_gives_distinct_windows(tmp_path: Path) -> None:
    from tiny_models import make_tokenizer
    from transformers import AutoTokenizer

    from llmq.calib import DEFAULT_SOURCE, builtin_texts

    assert DEFAULT_SOURCE == "builtin"
    texts = builtin_texts()
    assert len(texts) >= 8 and sum(len(t) for t in texts) > 40_000  # package data, every domain file
    make_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    t = calibration_tokens(CalibConfig("builtin", n_samples=10_000, seqlen=256), tok)
    n_ids = sum(len(tok(x, add_special_tokens=False)["input_ids"]) + 1 for x in texts)
    assert t.shape == (n_ids // 256, 256)  # capped at the distinct windows the text holds
    assert len({tuple(row.tolist()) for row in t}) == len(t)
    few = calibration_tokens(CalibConfig("builtin", n_samples=3, seqlen=256), tok)
    assert few.shape == (3, 256)


def test_input_stats_in_row_chunks_equal_the_float64_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmq.activations import InputStats

    monkeypatch.setattr(InputStats, "ROWS", 7)  # several chunks of a 20-wide Gram
    monkeypatch.setattr(InputStats, "BLOCK", 6)  # the upper block triangle summed, mirrored when read
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 20, generator=gen) * torch.linspace(0.1, 10, 20)
    s = torch.rand(20, generator=gen) + 0.5
    st = InputStats(20)
    for part in x:
        st.add(part)
    st.divide(s)
    x64 = x.reshape(-1, 20).double() / s.double()
    torch.testing.assert_close(st.mean_gram.double(), x64.T @ x64 / 150, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.mean_abs.double(), x64.abs().mean(0), rtol=1e-5, atol=1e-7)
    assert st.gram.dtype == torch.float32 and st.n == 150


def test_input_stats_without_a_gram_keep_the_same_importance() -> None:
    from llmq.activations import InputStats
    from llmq.errors import LlmqError

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 20, generator=gen) * torch.linspace(0.1, 10, 20)
    full, diag = InputStats(20), InputStats(20, gram=False)
    for part in x:
        full.add(part)
        diag.add(part)
    x64 = x.reshape(-1, 20).double()
    np.testing.assert_allclose(diag.mean_sq, (x64**2).mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(diag.mean_sq, full.mean_sq, rtol=1e-5)
    torch.testing.assert_close(diag.mean_abs, full.mean_abs)
    assert diag.n == full.n == 150
    with pytest.raises(LlmqError, match="no Gram"):
        _ = diag.gram
