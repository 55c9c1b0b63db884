"""Safetensors outputs (compressed-tensors, AutoAWQ) loaded by the real clients, and one search for all formats."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import make_tiny_llama

import llmq
from llmq.cli import main
from llmq.engine import open_job, run
from llmq.pipeline import output_paths, prepare
from llmq.sinks import FORMATS, GroupValues, OutputOptions, SinkBase, pack_int32, to_gguf_layout

CALIB = llmq.CalibConfig("self", n_samples=4, seqlen=32, batch_size=2)
CHECKPOINT_FORMATS = [f for f in FORMATS if f != "gguf"]
# settings each checkpoint format holds, run through a tiny model
CASES = {
    "compressed-tensors": [
        llmq.QuantConfig(bits=4, group_size=64),
        llmq.QuantConfig(bits=4, group_size=32, sym=True),
        llmq.QuantConfig(bits=8, group_size=-1),
        llmq.QuantConfig(bits=4, group_size=-1),
    ],
    "awq": [llmq.QuantConfig(bits=4, group_size=64), llmq.QuantConfig(bits=4, group_size=128)],
}
CT_NEWEST = "0.20.1"
GPTQMODEL = [
    "gptqmodel==7.7.0", "pypcre==0.6.4", "logbar==0.4.15", "threadpoolctl==3.8.0", "device-smi==0.5.7",
    "tokenicer==0.0.14", "defuser==0.0.28", "pillow==13.0.0",
]  # fmt: skip


class Capture(SinkBase):
    """The values a checkpoint output holds (checkpoint layout): linears as stored, other tensors
    (norms with folded scales) in the source dtype, as the engine hands them over."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def write(self, job, item) -> None:  # noqa: ANN001
        if item.plan.source is None:
            return
        if item.plan.role == "linear":  # the integer grid's values: scale * (q - z)
            self.values[item.plan.source] = torch.from_numpy(
                GroupValues(item.plan, item.bytes()).dequantize()
            )
        else:  # norms (with folded scales) in the checkpoint's dtype
            self.values[item.plan.source] = item.tensor.to(torch.bfloat16).float()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("fmt") / "m", hidden=256, intermediate=512, outliers=4.0)


@pytest.fixture(scope="session")
def gptqmodel_path(test_cache_dir: Path) -> Path:
    """gptqmodel (transformers' AWQ loader) in its own folder: its sdist with --no-deps and what it imports."""
    target = test_cache_dir / "gptqmodel-7.7.0"
    if not (target / "gptqmodel").is_dir():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
        ]
        done = subprocess.run([*cmd, *GPTQMODEL], capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            pytest.fail(f"installing gptqmodel failed: {done.stderr[-2000:]}")
    return target


@pytest.fixture(scope="session")
def ct_newest_path(test_cache_dir: Path) -> Path:
    """The newest compressed-tensors in its own folder (its dependencies are the installed 0.17.1's)."""
    target = test_cache_dir / f"compressed-tensors-{CT_NEWEST}"
    if not (target / "compressed_tensors").is_dir():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
        done = subprocess.run(
            [*cmd, f"compressed-tensors=={CT_NEWEST}"], capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            pytest.fail(f"installing compressed-tensors {CT_NEWEST} failed: {done.stderr[-2000:]}")
    return target


def _convert(model: Path, out: Path, fmt: str, cfg: llmq.QuantConfig) -> dict[str, torch.Tensor]:
    """Convert with ``fmt`` and GGUF from one search; return the stored linear values (engine's view)."""
    sinks = [FORMATS[f](p, OutputOptions()) for f, p in output_paths(model, out, cfg, [fmt, "gguf"]).items()]
    job = open_job(model, cfg, progress=False)
    prepare(job, sinks)
    llmq.engine.calibrate(job, CALIB)
    capture = Capture()
    run(job, [*sinks, capture])
    return capture.values


def _dense_logits(model: Path, values: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    state = dense.state_dict()
    with torch.no_grad():
        for name, v in values.items():
            state[name].copy_(v)
        return dense(ids).logits


def test_packing_equals_compressed_tensors() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        q = torch.randint(0, 2**bits, (24, 40), generator=gen)  # 40 columns: a ragged last word for 8 bits
        signed = (q - 2 ** (bits - 1)).to(torch.int8)
        for dim in (0, 1):
            want = pack_to_int32(signed, bits, packed_dim=dim).numpy()
            got = pack_int32(q.numpy(), bits) if dim == 1 else pack_int32(q.numpy().T, bits).T
            assert np.array_equal(got, want), (bits, dim)


@pytest.mark.parametrize("fmt", CHECKPOINT_FORMATS)
def test_checkpoint_is_a_model_directory(tiny: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "q"
    values = _convert(tiny, out, fmt, CASES[fmt][0])
    files = sorted(p.name for p in out.iterdir())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "search.json"):
        assert name in files, files
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("compressed-tensors" if fmt != "awq" else "awq")
    card = (out / "README.md").read_text()
    assert f"- {fmt}" in card and "library_name: transformers" in card and "pypi.org" not in card
    assert values and not list(tmp_path.glob(".*partial"))


def _client_logits(
    tiny: Path, tmp_path: Path, fmt: str, case: int, load: str, pythonpath: Path | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Convert ``CASES[fmt][case]`` and load the output in a fresh process with ``load`` (code that
    sets ``m`` from ``OUT``, the output path): its logits on seeded token ids, llmq's values, the ids."""
    out = tmp_path / fmt
    values = _convert(tiny, out, fmt, CASES[fmt][case])
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(case))
    np.save(tmp_path / "ids.npy", ids.numpy())
    script = (
        "import sys, numpy as np, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"OUT = {str(out)!r}\nids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))\n{load}\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, m(ids).logits.detach().float().numpy())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.from_numpy(np.load(tmp_path / "logits.npy")), values, ids


@pytest.mark.parametrize("case", range(len(CASES["compressed-tensors"])))
def test_compressed_tensors_loads_in_transformers(tiny: Path, tmp_path: Path, case: int) -> None:
    load = "m = AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()"
    got, values, ids = _client_logits(tiny, tmp_path, "compressed-tensors", case, load)
    want = _dense_logits(tiny, values, ids)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("case", range(2))
def test_newest_compressed_tensors_loads_with_dequantize(
    tiny: Path, tmp_path: Path, case: int, ct_newest_path: Path
) -> None:
    """compressed-tensors 0.20 loads asymmetric and symmetric groups through ``dequantize=True``
    (its default path refuses asymmetric zero-points: 'mismatched sizes')."""
    load = (
        "import compressed_tensors\n"
        f"assert compressed_tensors.__version__ == {CT_NEWEST!r}, compressed_tensors.__version__\n"
        "from transformers import CompressedTensorsConfig\n"
        "m = AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32, "
        "quantization_config=CompressedTensorsConfig(dequantize=True)).eval()"
    )
    got, values, ids = _client_logits(tiny, tmp_path, "compressed-tensors", case, load, ct_newest_path)
    # dequantize=True stores scale * (q - z) in the checkpoint's dtype (bf16), then runs a dense model
    want = _dense_logits(tiny, {k: v.bfloat16().float() for k, v in values.items()}, ids)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("case", range(len(CASES["awq"])))
def test_awq_loads_in_transformers(tiny: Path, tmp_path: Path, case: int, gptqmodel_path: Path) -> None:
    load = (
        "from transformers import AwqConfig\n"
        "m = AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32, device_map='cpu', "
        "quantization_config=AwqConfig(bits=4, backend='torch_awq')).eval()"
    )
    got, values, ids = _client_logits(tiny, tmp_path, "awq", case, load, gptqmodel_path)
    want = _dense_logits(tiny, values, ids)
    # the AWQ kernel multiplies in float16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fmt", CHECKPOINT_FORMATS)
def test_gguf_of_the_same_search_holds_the_same_values(tiny: Path, tmp_path: Path, fmt: str) -> None:
    cfg = CASES[fmt][0]
    out = tmp_path / "q"
    values = _convert(tiny, out, fmt, cfg)
    job = open_job(tiny, cfg, progress=False)
    reader = gguf.GGUFReader(out.with_name("q.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    for p in job.plans:
        if p.role != "linear":
            continue
        assert p.codec == ("Q4_1" if not cfg.sym else "Q4_0")
        stored = llmq.get_codec(p.codec).decode(np.asarray(tensors[p.name].data), p.shape)
        want = to_gguf_layout(p, job.arch, job.ckpt.config, values[p.source]).numpy()
        # the zero-point's f16 rounding in GGUF's minimum is the only difference
        scale = np.abs(want).max()
        np.testing.assert_allclose(stored, want, rtol=0, atol=2e-3 * scale)


def test_refused_settings_write_nothing(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["convert", str(tiny), "-o", str(tmp_path / "x"), "-q", "--method", "rtn"]
    cases = [
        (["--quant", "Q4_K_M", "--format", "awq"], "--format awq"),
        (["--bits", "5", "--format", "compressed-tensors"], "compressed-tensors holds"),
        (["--bits", "4", "--sym", "--format", "awq"], "AutoAWQ GEMM holds"),
        (
            ["--bits", "4", "--group", "96", "--format", "compressed-tensors"],
            "not a multiple of the group 96",
        ),
        (["--format", "safetensors"], "unknown output format 'safetensors'"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x").mkdir()
    assert main([*base, "--format", "compressed-tensors"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_full_disk_mid_write(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from llmq.writers import safetensors

    calls = {"n": 0}
    original = safetensors.ShardedSafetensorsWriter.write

    def full(self, name, data):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return original(self, name, data)

    monkeypatch.setattr(safetensors.ShardedSafetensorsWriter, "write", full)
    argv = ["convert", str(tiny), "-o", str(tmp_path / "x.gguf"), "-q", "--method", "rtn"]
    assert main([*argv, "--format", "gguf,compressed-tensors"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_lists_every_registered_format() -> None:
    from llmq.cli import FORMATS_HELP

    assert set(FORMATS_HELP) == set(FORMATS)


def test_sharded_checkpoint(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "ct"
    llmq.convert(tiny, out, llmq.QuantConfig(bits=4, group_size=64, method="rtn"), formats="compressed-tensors",
                 progress=False, max_shard_bytes=300_000)  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    from safetensors import safe_open

    for s in shards:
        with safe_open(out / s, "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == s
                f.get_tensor(k)
