"""Resumable runs: a conversion killed anywhere is finished by `--resume` with the bytes of an
uninterrupted run; two runs write the same bytes; a changed input or a full disk are handled."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny_models import make_tiny_llama

import llmq
from llmq.cli import main
from llmq.resume import WorkDir, work_path

ROOT = Path(__file__).resolve().parent.parent
CFG = "llmq.QuantConfig(bits=4, group_size=64)"
FORMATS = "gguf,compressed-tensors"
# A conversion in a child process that SIGKILLs itself at a chosen point (test code patches the
# library's own functions; nothing in llmq knows about it).
CHILD = """
import os, signal, sys
import llmq, llmq.resume, llmq.activations, llmq.awq, llmq.writers.safetensors
model, out, point, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = {"n": 0}
llmq.resume.ACTS_INTERVAL = float(os.environ.get("ACTS_INTERVAL", "0"))  # 0: activations after every layer

def killer(cls, name):
    original = getattr(cls, name)
    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*a, **k)
    setattr(cls, name, wrapped)

if point == "search":      # inside the n-th layer's AWQ search
    killer(llmq.awq.AWQSearch, "run")
elif point == "layer":     # after the n-th layer's tensors are kept, before its activations
    killer(llmq.resume.WorkDir, "save_activations")
elif point == "acts":      # half-way through copying the activations (a torn temporary file)
    original = llmq.activations.ActivationStore.save
    def torn(self, path):
        calls["n"] += 1
        if calls["n"] == n:
            with open(path, "wb") as f:
                f.write(b"x" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, path)
    llmq.activations.ActivationStore.save = torn
elif point == "write":     # mid-write of the safetensors output
    killer(llmq.writers.safetensors.ShardedSafetensorsWriter, "write")
elif point == "rename":    # at the outputs' rename
    original = os.replace
    def replace(a, b):
        if str(a).endswith(".partial") and "llmq-work" not in str(b) and ".safetensors" not in str(b):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(a, b)
    os.replace = replace
calib = llmq.CalibConfig("self", n_samples=4, seqlen=32, batch_size=2)
llmq.convert(model, out, CFG, formats=FORMATS, calib=calib, progress=False, resume=len(sys.argv) > 5)
""".replace("CFG", CFG).replace("FORMATS", repr(FORMATS))


def _digest(path: Path) -> dict[str, str]:
    """sha256 of every data file of the outputs (GGUF, shards); cards and reports record times."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _outputs(out: Path) -> dict[str, str]:
    return {**_digest(out), **_digest(out.with_name(out.stem + "-compressed-tensors"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("resume") / "m", n_layers=4, hidden=128, outliers=4.0)


@pytest.fixture(scope="module")
def reference(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An uninterrupted run's bytes (the child with nothing killed)."""
    out = tmp_path_factory.mktemp("ref") / "q.gguf"
    _child(tiny, out, "none", 0)
    assert not work_path(out).exists()
    return _outputs(out)


def _child(model: Path, out: Path, point: str, n: int, *, resume: bool = False, interval: float = 0) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACTS_INTERVAL": str(interval)}
    args = [sys.executable, "-c", CHILD, str(model), str(out), point, str(n)] + (["resume"] if resume else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    if done.returncode not in (0, -9):
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


def test_two_runs_write_the_same_bytes(tiny: Path, tmp_path: Path, reference: dict[str, str]) -> None:
    out = tmp_path / "q.gguf"
    _child(tiny, out, "none", 0)
    assert _outputs(out) == reference


@pytest.mark.parametrize(
    "point, n, kept",
    [("search", 3, 2), ("layer", 2, 1), ("acts", 3, 2), ("write", 40, None), ("rename", 1, 4)],
)
def test_killed_run_resumes_to_the_same_bytes(
    tiny: Path, tmp_path: Path, reference: dict[str, str], point: str, n: int, kept: int | None
) -> None:
    out = tmp_path / "q.gguf"
    assert _child(tiny, out, point, n) == -9  # SIGKILL
    work = work_path(out)
    assert (work / "manifest.json").is_file()
    done = WorkDir(work).resume_point(needs_activations=True)
    if kept is not None:
        assert done == kept, (point, done)
    assert _child(tiny, out, "none", 0, resume=True) == 0
    assert _outputs(out) == reference
    assert not work.exists() and not list(tmp_path.glob(".*.partial"))


def test_activations_kept_at_an_interval_resume_from_the_last_copy(
    tiny: Path, tmp_path: Path, reference: dict[str, str]
) -> None:
    """Activations are copied every `ACTS_INTERVAL` seconds: layers finished after the last copy are
    computed again on resume (their kept files replaced by the same bytes)."""
    out = tmp_path / "q.gguf"
    assert _child(tiny, out, "search", 3, interval=1e9) == -9
    work = WorkDir(work_path(out))
    assert work.layer_file(1).is_file() and not list(work.path.glob("acts-*.bin"))
    assert work.resume_point(needs_activations=True) == 0
    assert _child(tiny, out, "none", 0, resume=True) == 0
    assert _outputs(out) == reference


def test_resume_refuses_other_settings_and_a_plain_rerun_refuses_the_work_dir(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q.gguf"
    assert _child(tiny, out, "layer", 2) == -9
    argv = ["convert", str(tiny), "-o", str(out), "-q", "--bits", "4", "--group", "64",
            "--format", FORMATS, "--calib-samples", "4", "--calib-seqlen", "32"]  # fmt: skip
    assert main(argv) == 2  # no --resume: the work directory is in the way
    err = capsys.readouterr().err
    assert "llmq-work" in err and "--resume" in err and len(err.splitlines()) == 1
    assert main([*argv[:-4], "--calib-samples", "6", "--calib-seqlen", "32", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot be resumed" in err.splitlines()[-1] and "calibration" in err.splitlines()[-1]
    assert WorkDir(work_path(out)).resume_point(needs_activations=True) == 1  # untouched


def test_full_disk_keeps_the_work_dir_and_resume_continues(
    tiny: Path, tmp_path: Path, reference: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "q.gguf"
    calls = {"n": 0}
    original = llmq.resume.save_file

    def full(tensors, path, metadata=None):  # noqa: ANN001  (the kept layer's write, in the background)
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(llmq.resume, "save_file", full)
    monkeypatch.setattr(llmq.resume, "ACTS_INTERVAL", 0.0)  # activations after every layer
    calib = llmq.CalibConfig("self", n_samples=4, seqlen=32, batch_size=2)
    cfg = llmq.QuantConfig(bits=4, group_size=64)
    with pytest.raises(OSError, match="No space left"):
        llmq.convert(tiny, out, cfg, formats=FORMATS, calib=calib, progress=False)
    # the failed run stopped its writer threads (a library caller may retry in the same process)
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("work-write", "gguf"))]
    assert WorkDir(work_path(out)).resume_point(needs_activations=True) == 2
    assert not out.exists()
    monkeypatch.setattr(llmq.resume, "save_file", original)
    llmq.convert(tiny, out, cfg, formats=FORMATS, calib=calib, progress=False, resume=True)
    assert _outputs(out) == reference
