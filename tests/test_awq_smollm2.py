"""AWQ on the SmolLM2 reference through llama.cpp: better perplexity and KL than round-to-nearest.

A small calibration (16 windows of 256 tokens of groups_merged.txt, never WikiText) keeps this near
five minutes; the full 128 x 512 figures at 100 chunks are in BENCHMARKS.md (tools/bench_quality.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import llmq
from llmq.calib import CalibConfig
from llmq.eval import evaluate

pytestmark = pytest.mark.integration
CHUNKS = 8


@pytest.fixture(scope="module")
def files(
    reference_model_dir: Path, calibration_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("awq-smol")
    calib = CalibConfig(str(calibration_path), n_samples=16, seqlen=256, batch_size=8)
    files = {}
    for name, method in (("F16", "rtn"), ("rtn", "rtn"), ("awq", "awq")):
        cfg = llmq.QuantConfig(method=method, quant="F16" if name == "F16" else "Q4_0")
        files[name] = llmq.convert(
            reference_model_dir, out / f"{name}.gguf", cfg, calib=calib, progress=False
        ).path
    return files


def test_awq_beats_rtn_in_llama_cpp(files: dict[str, Path], wikitext_path: Path) -> None:
    res = {
        k: evaluate(files[k], wikitext_path, ref=files["F16"], n_chunks=CHUNKS, n_threads=2, progress=False)
        for k in ("rtn", "awq")
    }
    print(
        f"\nQ4_0, {CHUNKS} chunks: RTN PPL {res['rtn'].ppl:.3f} KL {res['rtn'].kl.mean:.4f}; "  # type: ignore[union-attr]
        f"AWQ PPL {res['awq'].ppl:.3f} KL {res['awq'].kl.mean:.4f}; F16 {res['awq'].ref_perplexity.ppl:.3f}"  # type: ignore[union-attr]
    )
    assert res["awq"].ppl < res["rtn"].ppl
    assert res["awq"].kl.mean < 0.8 * res["rtn"].kl.mean  # type: ignore[union-attr]


def test_awq_report_on_smollm2(files: dict[str, Path]) -> None:
    import json

    report = json.loads(files["awq"].with_suffix(".search.json").read_text())
    layers = report["layers"]
    assert len(layers) == 30 and report["calibration"]["samples"] == 16
    # SmolLM2 uses grouped-query attention: v -> o is skipped, the three other groups are searched
    for layer in layers:
        searched = [g for g in layer["scales"] if "loss_before" in g]
        assert len(searched) == 3 and all(g["loss_after"] <= g["loss_before"] for g in searched)
        assert any("skipped" in g for g in layer["scales"])
        assert set(layer["clip"]) == {
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        }
