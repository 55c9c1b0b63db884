"""The cost said before a calibrated run (`llmq.estimate`): the FLOPs it counts are the products the
calibration runs, for every dense family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny
from torch.utils.flop_counter import FlopCounterMode

import llmq
from llmq.activations import ActivationStore, InputStats, LayerRunner, capture_inputs
from llmq.arch import registered
from llmq.engine import open_job
from llmq.estimate import calibration_cost, layer_flops, plan_line

DENSE = sorted(name for name, spec in registered().items() if spec.experts is None)


@pytest.mark.parametrize("family", DENSE)
@pytest.mark.parametrize("quant_inputs", [False, True])
def test_layer_flops_are_the_products_the_calibration_runs(
    family: str, quant_inputs: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The linears' products (torch's own count of ``mm``/``addmm``) and the Gram sums (every
    ``addmm_`` of `InputStats.add`) of a capture pass, plus the quantized pass when inputs come from
    it, equal `layer_flops` without its attention term."""
    model = make_tiny(family, tmp_path / "m", n_layers=1, dtype=torch.float32)
    ckpt = llmq.Checkpoint(model)
    arch = llmq.get_arch(ckpt.config)
    layer = next(iter(llmq.LayerStream(ckpt, arch)))[1]
    runner = LayerRunner(ckpt.config, arch)
    hidden = ckpt.config.hidden_size
    store = ActivationStore(4, 16, hidden, batch_size=2, directory=str(tmp_path))
    for i in range(len(store)):
        store.write(i, torch.randn(2, 16, hidden, generator=torch.Generator().manual_seed(i)))
    gram = [0.0]
    addmm_ = torch.Tensor.addmm_

    def counted(self: torch.Tensor, a: torch.Tensor, b: torch.Tensor, **kw: object) -> torch.Tensor:
        gram[0] += 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        return addmm_(self, a, b, **kw)

    monkeypatch.setattr(torch.Tensor, "addmm_", counted)
    with FlopCounterMode(display=False) as fc:
        capture_inputs(layer, arch.capture_modules, store, runner, write_outputs=not quant_inputs)
        if quant_inputs:  # `CalibrationFlow.advance`: the (quantized) layer on every window
            for i in range(len(store)):
                store.write(i, runner(layer, store.read(i)))
    counts = fc.get_flop_counts()["Global"]
    products = sum(counts.get(op, 0) for op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    linears = [(n, tuple(m.weight.shape)) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    want = layer_flops(
        linears,
        arch.capture_modules,
        tokens=64,
        seqlen=16,
        attn_width=0,
        forwards=2 if quant_inputs else 1,
        last_reader=arch.capture_modules[-1],
        gram_block=InputStats.BLOCK,
    )
    assert gram[0] > 0 and products > 0
    assert products + gram[0] == want


def test_the_cost_line(tmp_path: Path) -> None:
    """A dense model gets the sentence (per layer, the rate, the floor for the layers left); a
    mixture-of-experts model none."""
    dense = open_job(str(make_tiny("llama", tmp_path / "d", n_layers=3)), llmq.QuantConfig(quant="Q4_0"))
    line = calibration_cost(dense, (8, 64), gram_block=InputStats.BLOCK, start=1)
    assert line is not None and line.startswith("calibration work: ") and "for 2 layers" in line
    moe = open_job(str(make_tiny("mixtral", tmp_path / "x")), llmq.QuantConfig(quant="Q4_0"))
    assert calibration_cost(moe, (8, 64), gram_block=InputStats.BLOCK) is None
    assert plan_line(32 * 6e13, 2e11, 32, "cpu") == (
        "calibration work: 60 TFLOP per layer (forwards and Gram products); this cpu multiplies at "
        "200 GFLOP/s, so at least 5 min per layer and 2.7 h for 32 layers, before the search and the encoding"
    )
    assert "at least 2.0 s per layer and 60 s for 30 layers" in plan_line(30 * 6e12, 3e12, 30, "cuda")
