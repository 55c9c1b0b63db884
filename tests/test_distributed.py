"""Calibration split across two gloo processes (``torchrun``): the single-process search and file, within
floating-point tolerance; each process encodes its share of the linears; process 0 alone writes."""

from __future__ import annotations

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

from llmq.codecs import REGISTRY

SCRIPT = """
import json, os, sys, torch, llmq
import llmq.engine as engine
from llmq.awq import AWQConfig
src, out = sys.argv[1], sys.argv[2]
calls, encode = [], engine.encode_tensor  # which tensors this process encodes
engine.encode_tensor = lambda plan, *a, **k: (calls.append(plan.name), encode(plan, *a, **k))[1]
tokens = torch.randint(3, 250, (8, 32), generator=torch.Generator().manual_seed(0))
# next inputs from the FP layer: a code that rounds the other way in one layer does not move the next
llmq.convert(src, out, llmq.QuantConfig(quant="Q4_0"), calib=tokens, awq=AWQConfig(inputs="fp"),
             overwrite=True, progress=False, write_card=False)
with open(f"{out}.calls{os.environ.get('RANK', '0')}", "w") as f:
    json.dump(calls, f)
from llmq.imatrix import compute_imatrix  # statistics without Gram matrices, summed the same way
imat = compute_imatrix(src, tokens, progress=False)
with open(f"{out}.imatrix{os.environ.get('RANK', '0')}", "w") as f:
    json.dump({k: v.tolist() for k, v in imat.items()}, f)
"""


def _run(args: list[str], tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]


def _tensors(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        codec = REGISTRY.get(t.tensor_type.name)
        shape = tuple(int(d) for d in reversed(t.shape))
        data = np.asarray(t.data)
        out[t.name] = (
            np.asarray(codec.decode(data, shape)) if codec is not None and not codec.is_float else data
        )
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("dist") / "m", n_layers=2, dtype=torch.float32, outliers=8.0
    )


def test_owners_balance_the_bytes_the_same_way_in_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmq import distributed

    sizes = {"q": 40, "k": 10, "v": 10, "o": 40, "gate": 140, "up": 140, "down": 140}
    monkeypatch.setattr(distributed, "world", lambda: (0, 1))
    assert set(distributed.owners(sizes).values()) == {0}
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    owner = distributed.owners(sizes)
    assert owner == distributed.owners(dict(reversed(sizes.items())))  # not by the order given
    load = [sum(n for k, n in sizes.items() if owner[k] == r) for r in (0, 1)]
    assert load == [280, 240]  # largest first, each to the lighter process


def test_two_gloo_processes_give_the_single_process_search(tiny: Path, tmp_path: Path) -> None:
    script = tmp_path / "convert.py"
    script.write_text(SCRIPT)
    _run([sys.executable, str(script), str(tiny), str(tmp_path / "one.gguf")], tmp_path)
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         str(script), str(tiny), str(tmp_path / "two.gguf")],
        tmp_path,
    )  # fmt: skip
    # each process encoded its share of the linears, process 0 the rest of the file too
    single = json.loads((tmp_path / "one.gguf.calls0").read_text())
    calls = [json.loads((tmp_path / f"two.gguf.calls{r}").read_text()) for r in (0, 1)]
    assert calls[1] and not set(calls[0]) & set(calls[1])
    assert sorted(calls[0] + calls[1]) == sorted(single)
    assert all(".attn_" in n or ".ffn_" in n for n in calls[1])
    one = json.loads((tmp_path / "one.search.json").read_text())
    two = json.loads((tmp_path / "two.search.json").read_text())
    for a, b in zip(one["layers"], two["layers"], strict=True):
        for ga, gb in zip(a["scales"], b["scales"], strict=True):
            assert ga.get("alpha") == gb.get("alpha")
            if "loss_before" in ga:
                assert gb["loss_before"] == pytest.approx(
                    ga["loss_before"], rel=1e-2
                )  # a code may round the other way
    im1 = json.loads((tmp_path / "one.gguf.imatrix0").read_text())
    for r in (0, 1):  # every process holds the sums over all windows
        im2 = json.loads((tmp_path / f"two.gguf.imatrix{r}").read_text())
        assert im1.keys() == im2.keys() and len(im1) == 2 * 7
        for k in im1:
            np.testing.assert_allclose(im2[k], im1[k], rtol=1e-5)
    ta, tb = _tensors(tmp_path / "one.gguf"), _tensors(tmp_path / "two.gguf")
    assert ta.keys() == tb.keys()
    rel = {
        n: float(
            np.linalg.norm(tb[n].astype(np.float64) - ta[n])
            / max(np.linalg.norm(ta[n].astype(np.float64)), 1e-30)
        )
        for n in ta
    }
    print("relative difference per tensor:", {n: f"{r:.1e}" for n, r in rel.items()})
    # the same statistics up to summation order: the folded scales agree to float precision; in the
    # quantized tensors a rare code rounds (or a clip range shrinks) the other way
    assert all(r < 1e-6 for n, r in rel.items() if "norm" in n)
    assert max(rel.values()) < 1e-2
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.llmq-work"))
