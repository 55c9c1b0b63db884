"""Bad input: a one-line error naming the problem, exit code != 0, and no output file left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import make_tiny_llama

from llmq import QuantConfig
from llmq.cli import cli_message, main
from llmq.errors import LlmqError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("err") / "sharded", max_shard_size="200KB")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code: int, err: str, out_dir: Path, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmq: error:"), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert not [p for p in out_dir.iterdir() if p.suffix in (".gguf", ".md", ".partial")], list(
        out_dir.iterdir()
    )


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors(sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = copy(sharded, tmp_path / "model")
    shard = sorted(model.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(["convert", "--method", "rtn", str(model), "-o", str(out / "x.gguf"), "-q"], capsys)
    assert_clean_failure(code, err, out, shard.name)


def test_missing_shard(sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = copy(sharded, tmp_path / "model")
    shard = sorted(model.glob("*.safetensors"))[-1]
    shard.unlink()
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(["convert", "--method", "rtn", str(model), "-o", str(out / "x.gguf"), "-q"], capsys)
    assert_clean_failure(code, err, out, shard.name, "missing")


def test_unsupported_architecture(sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = copy(sharded, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    cfg["model_type"] = "gpt_neox"
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(["convert", "--method", "rtn", str(model), "-o", str(out / "x.gguf"), "-q"], capsys)
    assert_clean_failure(code, err, out, "GPTNeoXForCausalLM", "LlamaForCausalLM")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--bits", "3"], "--bits 3"),
        (["--bits", "6", "--sym"], "--bits 6"),
        (["--bits", "4", "--group", "48"], "--group 48"),
        (["--quant", "Q4_K_X"], "Q4_K_X"),
        (["--tensor-type", "ffn_down"], "PATTERN=TYPE"),
        (["--tensor-type", "ffn_down=Q9_K"], "Q9_K"),
        (["--imatrix", "missing.imatrix.gguf"], "missing.imatrix.gguf"),
        (["--quant", "Q4_0", "--bits", "4"], "--quant"),
    ],
)
def test_options_the_format_cannot_hold(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    code, err = run(
        ["convert", "--method", "rtn", str(sharded), "-o", str(tmp_path / "x.gguf"), "-q", *flags], capsys
    )
    assert_clean_failure(code, err, tmp_path, needle)


@pytest.mark.parametrize(
    "fields, words, flags",
    [
        ({"bits": 3}, "bits=3", "--bits 3"),
        ({"bits": 6, "sym": True}, "bits=6 sym=True", "--bits 6 --sym"),
        ({"group_size": 48}, "group_size=48", "--group 48"),
        ({"quant": "Q4_0", "group_size": 64}, "quant=Q4_0", "--quant Q4_0"),
        ({"method": "gptq"}, "method=gptq", "--method gptq"),
    ],
)
def test_library_errors_name_fields_and_the_cli_its_flags(fields: dict, words: str, flags: str) -> None:
    """The library names the config fields a caller passed; the CLI shows the same error with its flags."""
    with pytest.raises(LlmqError) as e:
        QuantConfig(**fields)
    assert words in str(e.value) and "--" not in str(e.value)
    assert flags in cli_message(str(e.value))


def test_existing_output_is_not_overwritten(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"precious")
    code, err = run(["convert", "--method", "rtn", str(sharded), "-o", str(out), "-q"], capsys)
    assert code != 0 and "already exists" in err and str(out) in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"precious"
    assert main(["convert", "--method", "rtn", str(sharded), "-o", str(out), "-q", "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_pickle_checkpoint_refused_unless_allowed(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    model.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sharded / f, model / f)
    state = {}
    for shard in sharded.glob("*.safetensors"):
        state.update(load_file(shard))
    torch.save(state, model / "pytorch_model.bin")
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(["convert", "--method", "rtn", str(model), "-o", str(out / "x.gguf"), "-q"], capsys)
    assert_clean_failure(code, err, out, "pytorch_model.bin", "--allow-pickle")
    assert (
        main(["convert", "--method", "rtn", str(model), "-o", str(out / "x.gguf"), "-q", "--allow-pickle"])
        == 0
    )


def test_interrupted_conversion_leaves_no_file(
    sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmq.engine
    import llmq.sinks.gguf

    calls = {"n": 0}
    original = llmq.engine.encode_tensor

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(llmq.engine, "encode_tensor", failing)
    monkeypatch.setattr(llmq.sinks.gguf, "encode_tensor", failing)
    argv = ["convert", "--method", "rtn", str(sharded), "-o", str(tmp_path / "x.gguf"), "-q"]
    assert main([*argv, "--format", "gguf,compressed-tensors,awq"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_not_a_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(
        ["convert", "--method", "rtn", str(tmp_path / "nope" / "missing"), "-o", str(tmp_path / "x.gguf")],
        capsys,
    )
    assert code != 0 and "missing" in err
    (tmp_path / "empty").mkdir()
    code, err = run(
        ["convert", "--method", "rtn", str(tmp_path / "empty"), "-o", str(tmp_path / "x.gguf")], capsys
    )
    assert code != 0 and "config.json" in err
