"""llama.cpp's K-quant mixes and importance matrices, against llama.cpp itself.

For every mix in `llmq.mixes.MIXES`, llmq's per-tensor types and tensor bytes (round to nearest, and
with an importance matrix) must equal `llama_model_quantize`'s on the F16 file of the same tiny model;
the importance-matrix files llmq writes must read back exactly (both formats).
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import logit_kl, make_tiny_llama

import llmq
from llmq.errors import FormatError, LlmqError, SourceError
from llmq.eval.llamacpp import quantize_with_llama_cpp
from llmq.imatrix_io import read_imatrix, write_imatrix
from llmq.mixes import MIXES, WHEN, category, mix_type, parse_tensor_types

MIX_NAMES = sorted(MIXES)


def _tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.array(t.data).view(np.uint8).reshape(-1)) for t in r.tensors}


def _assert_same_file(ours: Path, ref: Path) -> None:
    a, b = _tensors(ours), _tensors(ref)
    assert sorted(a) == sorted(b)
    types_a = {n: t for n, (t, _) in a.items()}
    types_b = {n: t for n, (t, _) in b.items()}
    assert types_a == types_b, {n: (types_a[n], types_b[n]) for n in a if types_a[n] != types_b[n]}
    for name, (_, data) in a.items():
        assert np.array_equal(data, b[name][1]), f"{name} ({types_a[name]}): bytes differ from llama.cpp"


@pytest.fixture(scope="module", params=["gqa4-untied", "gqa2-tied"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 16-layer model with rows of 256 (every K type applies) and its F16 GGUF written by llmq."""
    gqa4 = request.param == "gqa4-untied"
    root = tmp_path_factory.mktemp(request.param)
    src = make_tiny_llama(
        root / "m",
        n_layers=16,
        hidden=256,
        heads=8,
        kv_heads=2 if gqa4 else 4,
        intermediate=512,
        tie=not gqa4,
        dtype=torch.float16,  # the F16 file then holds exactly the checkpoint's values
    )
    f16 = llmq.convert(
        src, root / "f16.gguf", llmq.QuantConfig(quant="F16"), progress=False, write_card=False
    )
    return src, f16.path


def _entries(f16: Path) -> dict[str, np.ndarray]:
    """An importance of real spread for every layer linear of the model (as llama-imatrix collects)."""
    rng = np.random.default_rng(3)
    return {
        t.name: np.exp(rng.standard_normal(int(t.shape[0]))).astype(np.float32)
        for t in gguf.GGUFReader(f16).tensors
        if t.name.startswith("blk.") and len(t.shape) == 2
    }


@pytest.fixture(scope="module")
def imatrix_path(model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("imat") / "m.imatrix.gguf"
    return write_imatrix(path, _entries(model[1]), n_tokens=1000, chunk_count=4)


@pytest.mark.parametrize("mix", MIX_NAMES)
def test_mix_matches_llama_quantize(mix: str, model: tuple[Path, Path], tmp_path: Path) -> None:
    src, f16 = model
    ours = llmq.convert(
        src,
        tmp_path / "ours.gguf",
        llmq.QuantConfig(quant=mix, method="rtn"),
        progress=False,
        write_card=False,
    )
    ref = quantize_with_llama_cpp(f16, tmp_path / "ref.gguf", mix, n_threads=1)
    _assert_same_file(ours.path, ref)
    r = gguf.GGUFReader(ours.path)
    assert int(r.fields["general.file_type"].contents()) == int(MIXES[mix].file_type)


@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_M", "Q4_K_M"])  # Q5_K/Q6_K weighted: test_kquants.py
def test_mix_with_imatrix_matches_llama_quantize(
    mix: str, model: tuple[Path, Path], imatrix_path: Path, tmp_path: Path
) -> None:
    src, f16 = model
    cfg = llmq.QuantConfig(quant=mix, method="rtn")
    ours = llmq.convert(src, tmp_path / "o.gguf", cfg, imatrix=imatrix_path, progress=False, write_card=False)
    imat = read_imatrix(imatrix_path)
    ref = quantize_with_llama_cpp(f16, tmp_path / "r.gguf", mix, imatrix=imat.entries, n_threads=1)
    _assert_same_file(ours.path, ref)
    plain = llmq.convert(src, tmp_path / "p.gguf", cfg, progress=False, write_card=False)
    assert (
        _tensors(plain.path)["blk.0.ffn_down.weight"][1].tobytes()
        != _tensors(ours.path)["blk.0.ffn_down.weight"][1].tobytes()
    )  # the importance was used
    fields = gguf.GGUFReader(ours.path).fields
    assert int(fields["quantize.imatrix.entries_count"].contents()) == len(imat.entries)
    # llmq.quantize takes the same importance matrix and gives the file's bytes
    qm = llmq.quantize(src, cfg, imatrix=imatrix_path, progress=False)
    for name, (_, data) in _tensors(ours.path).items():
        assert qm.data[name].tobytes() == data.tobytes(), name


def test_rules_are_data_and_follow_llama_cpp() -> None:
    # llama-quantize's use_more_bits for 16 layers: 0, 1, 4, 7, 10, 13, 14, 15
    assert [i for i in range(16) if WHEN["more_bits"](i, 16, None)] == [0, 1, 4, 7, 10, 13, 14, 15]  # type: ignore[arg-type]
    assert category("blk.3.attn_v.weight") == "attn_v" and category("output.weight") == "output"
    assert category("blk.0.ffn_down.weight") == "ffn_down" and category("blk.0.attn_norm.weight") == "other"
    for mix in MIXES.values():
        for rule in mix.rules:
            assert rule.when in WHEN and rule.type in llmq.codecs.REGISTRY, (mix.name, rule)
    model = llmq.mixes.ModelShape(n_layers=32, n_gqa=8)
    assert mix_type(MIXES["Q4_K_M"], "output.weight", None, (100, 4096), model) == "Q6_K"
    assert mix_type(MIXES["Q4_K_M"], "output.weight", None, (100, 576), model) == "Q8_0"
    assert mix_type(MIXES["Q2_K"], "blk.5.attn_v.weight", 5, (1024, 4096), model) == "Q4_K"  # GQA >= 4


def test_tensor_type_overrides_first_match_wins(model: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = model
    cfg = llmq.QuantConfig(
        quant="Q4_K_M",
        method="rtn",
        tensor_types=(("blk\\.0\\.ffn_down", "Q8_0"), ("ffn_down", "Q5_K"), ("attn_q", "Q4_0")),
    )
    plans = {p.name: p.codec for p in llmq.convert(src, tmp_path / "o.gguf", cfg, progress=False).plans}
    assert plans["blk.0.ffn_down.weight"] == "Q8_0"
    assert {plans[f"blk.{i}.ffn_down.weight"] for i in range(1, 16)} == {"Q5_K"}  # no mix rule applies
    assert plans["blk.3.attn_q.weight"] == "Q4_0"
    assert plans["blk.3.attn_k.weight"] == "Q4_K"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"quant": "Q4_K_M", "tensor_types": (("ffn_(", "Q8_0"),)}, "regular expression"),
        ({"quant": "Q4_K_M", "tensor_types": (("ffn_down", "Q9_K"),)}, "unknown type"),
        ({"quant": "Q4_K_M", "group_size": 128}, "fixes the block layout"),
        ({"bits": 3}, "Q3_K_M"),
    ],
)
def test_config_errors_name_the_option(kwargs: dict, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        llmq.QuantConfig(**kwargs)


@pytest.mark.parametrize("legacy", [False, True])
def test_imatrix_files_round_trip(tmp_path: Path, legacy: bool) -> None:
    rng = np.random.default_rng(4)
    entries = {f"blk.{i}.ffn_down.weight": rng.random(64).astype(np.float32) + 0.1 for i in range(3)}
    path = write_imatrix(
        tmp_path / ("m.dat" if legacy else "m.gguf"),
        entries,
        n_tokens=2048,
        datasets=["calib.txt"],
        chunk_count=4,
        chunk_size=512,
        legacy=legacy,
    )
    back = read_imatrix(path)
    assert back.legacy == legacy and back.datasets == ("calib.txt",) and back.chunk_count == 4
    assert sorted(back.entries) == sorted(entries)
    for name, v in entries.items():
        np.testing.assert_allclose(back.entries[name], v, rtol=1e-6)
    if not legacy:  # llama.cpp's layout: F32 in_sum2 (K values) and counts, general.type = imatrix
        r = gguf.GGUFReader(path)
        assert r.fields["general.type"].contents() == "imatrix"
        names = {t.name: t for t in r.tensors}
        assert names["blk.0.ffn_down.weight.counts"].data.reshape(-1).tolist() == [2048.0]
        assert names["blk.0.ffn_down.weight.in_sum2"].data.size == 64


def test_imatrix_errors_are_clear(tmp_path: Path, model: tuple[Path, Path]) -> None:
    src, _ = model
    bad = tmp_path / "bad.dat"
    bad.write_bytes(struct.pack("<ii", 1, 30) + b"blk.0")  # name cut short
    with pytest.raises(SourceError, match="bad.dat"):
        read_imatrix(bad)
    with pytest.raises(SourceError, match="not found"):
        read_imatrix(tmp_path / "missing.gguf")
    wrong = write_imatrix(tmp_path / "w.gguf", {"blk.0.ffn_down.weight": np.ones(7, np.float32)}, n_tokens=1)
    cfg = llmq.QuantConfig(quant="Q4_K_M", method="rtn")
    with pytest.raises(LlmqError, match="blk.0.ffn_down.weight has 7 values"):
        llmq.convert(src, tmp_path / "o.gguf", cfg, imatrix=wrong, progress=False)
    with pytest.raises(LlmqError, match="method=rtn"):
        llmq.convert(
            src, tmp_path / "o.gguf", llmq.QuantConfig(quant="Q4_K_M"), imatrix=wrong, progress=False
        )
    assert not (tmp_path / "o.gguf").exists()


def test_cli_imatrix_then_convert(model: tuple[Path, Path], tmp_path: Path) -> None:
    from llmq.cli import main

    src, _ = model
    out = tmp_path / "m.imatrix.gguf"
    assert (
        main(["imatrix", str(src), "-o", str(out), "--calib-samples", "2", "--calib-seqlen", "32", "-q"]) == 0
    )
    imat = read_imatrix(out)
    assert len(imat.entries) == 16 * 7 and imat.chunk_count == 2
    gguf_out = tmp_path / "m.gguf"
    rc = main(["convert", str(src), "--quant", "Q4_K_S", "--imatrix", str(out), "-o", str(gguf_out), "-q"])
    assert rc == 0
    assert gguf.GGUFReader(gguf_out).fields["quantize.imatrix.file"].contents() == str(out)


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_llama_quantize_reads_llmq_imatrix_files(
    fmt: str, model: tuple[Path, Path], llama_quantize_bin: Path, tmp_path: Path
) -> None:
    """The real llama-quantize, given llmq's imatrix file and --tensor-type overrides, writes llmq's bytes."""
    src, f16 = model
    imat = read_imatrix(
        write_imatrix(tmp_path / f"m.{fmt}", _entries(f16), n_tokens=512, chunk_count=2, legacy=fmt == "dat")
    )
    overrides = ["blk\\.1[0-5]\\.ffn_down=q8_0", "attn_q=q5_0"]
    ref = tmp_path / "ref.gguf"
    cmd = [str(llama_quantize_bin), "--imatrix", str(imat.path)]
    for o in overrides:
        cmd += ["--tensor-type", o]
    proc = subprocess.run(
        [*cmd, str(f16), str(ref), "Q4_K_M", "1"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"loaded {len(imat.entries)} importance matrix entries" in proc.stdout + proc.stderr
    cfg = llmq.QuantConfig(quant="Q4_K_M", method="rtn", tensor_types=parse_tensor_types(overrides))
    ours = llmq.convert(src, tmp_path / "ours.gguf", cfg, imatrix=imat, progress=False, write_card=False)
    assert {p.codec for p in ours.plans if p.name.startswith("blk.12.ffn_down")} == {"Q8_0"}
    _assert_same_file(ours.path, ref)


def test_awq_searches_through_the_k_codecs(tmp_path: Path) -> None:
    """AWQ with a K mix: scales and clipping searched through the importance-weighted K encoders."""
    model = make_tiny_llama(
        tmp_path / "m", n_layers=2, hidden=256, intermediate=512, dtype=torch.float32, outliers=10.0
    )
    cfg = llmq.QuantConfig(quant="Q3_K_M")
    rtn = llmq.convert(
        model, tmp_path / "rtn.gguf", llmq.QuantConfig(quant="Q3_K_M", method="rtn"), progress=False
    )
    calib = llmq.CalibConfig("self", n_samples=16, seqlen=64, batch_size=8)
    awq = llmq.convert(model, tmp_path / "awq.gguf", cfg, calib=calib, progress=False)
    assert [(p.name, p.codec) for p in awq.plans] == [(p.name, p.codec) for p in rtn.plans]
    assert {p.codec for p in awq.plans} >= {"Q3_K", "Q4_K", "Q5_K"}
    scales = [g for r in awq.reports for g in r.details["scales"] if "loss_before" in g]
    assert scales and all(g["loss_after"] <= g["loss_before"] for g in scales)
    tokens = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(9))
    kl_rtn, kl_awq = logit_kl(model, rtn.path, tokens), logit_kl(model, awq.path, tokens)
    assert kl_awq < 0.8 * kl_rtn, (kl_awq, kl_rtn)


@pytest.mark.integration
def test_smollm2_q4_k_m_is_llama_cpps(reference_model_dir: Path, tmp_path: Path) -> None:
    """Issue acceptance: llmq's Q4_K_M of SmolLM2 (RTN) has llama-quantize's tensor types and bytes."""
    f16 = llmq.convert(
        reference_model_dir,
        tmp_path / "f16.gguf",
        llmq.QuantConfig(quant="F16"),
        progress=False,
        write_card=False,
    )
    ours = llmq.convert(
        reference_model_dir,
        tmp_path / "q.gguf",
        llmq.QuantConfig(quant="Q4_K_M", method="rtn"),
        progress=False,
        write_card=False,
    )
    ref = quantize_with_llama_cpp(f16.path, tmp_path / "ref.gguf", "Q4_K_M")
    _assert_same_file(ours.path, ref)
    types = {p.name: p.codec for p in ours.plans}
    # rows of 576 fall back as llama-quantize does; ffn_down (rows of 1536) is K-quantized
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.0.ffn_down.weight"] == "Q6_K"
    assert types["blk.4.ffn_down.weight"] == "Q4_K" and types["token_embd.weight"] == "Q8_0"


def test_imatrix_equals_llama_imatrix(
    model: tuple[Path, Path], llama_imatrix_bin: Path, calibration_path: Path, tmp_path: Path
) -> None:
    """llmq's importance matrix equals llama.cpp's own `llama-imatrix` on the same token windows: the
    same entries, token counts and mean squares (llama.cpp's forward runs the F16 file with float16
    products, llmq's the checkpoint in float32)."""
    import llama_cpp

    from llmq.imatrix import compute_imatrix

    src, f16 = model
    n_ctx, chunks = 128, 4
    text = tmp_path / "calib.txt"
    text.write_text(calibration_path.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    out = tmp_path / "llama.imatrix.gguf"
    cmd = [str(llama_imatrix_bin), "-m", str(f16), "-f", str(text), "-o", str(out)]
    cmd += ["-c", str(n_ctx), "--chunks", str(chunks), "-t", "2", "--no-ppl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ref = read_imatrix(out)
    # llama-imatrix's windows: the text's tokens in consecutive chunks, each starting with BOS where
    # the vocabulary adds one (compute_imatrix in tools/imatrix/imatrix.cpp)
    vocab = llama_cpp.Llama(str(f16), vocab_only=True, verbose=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(vocab.model))
    ids = np.array(vocab.tokenize(text.read_bytes(), add_bos=True, special=False)[: n_ctx * chunks])
    windows = ids.reshape(chunks, n_ctx)
    if add_bos:
        windows[:, 0] = vocab.token_bos()
    ours = compute_imatrix(src, torch.from_numpy(windows), progress=False)
    assert sorted(ours) == sorted(ref.entries)
    assert set(ref.counts.values()) == {n_ctx * chunks}
    worst = {}
    for name, want in ref.entries.items():
        rel = np.abs(ours[name] - want) / np.maximum(np.abs(want), 1e-3 * want.mean())
        worst[name] = float(rel.max())
    assert max(worst.values()) < 2e-2, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
