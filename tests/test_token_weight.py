"""``--awq-token-weight residual``: each calibration token weighed by 1/mean(h^2) of the residual it
writes into, for the readers whose error stays at its own position (o, gate/up, down)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import make_tiny_llama

import llmq
from llmq.activations import CalibrationFlow, InputStats, residual_weights
from llmq.awq import AWQConfig
from llmq.report import parse_awq_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("tokw") / "m", n_layers=2, kv_heads=4, dtype=torch.float32, outliers=8.0
    )


@pytest.mark.parametrize("skip_first", [0, 1])
def test_weighted_statistics_are_the_weighted_means(skip_first: int) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 10, 16, generator=gen)
    w = torch.rand(3, 10, generator=gen) + 0.1
    st = InputStats(16, skip_first=skip_first)
    st.add(x[:2], w[:2])  # two mini-batches, as the flow feeds them
    st.add(x[2:], w[2:])
    xs, ws = x[:, skip_first:].reshape(-1, 16).double(), w[:, skip_first:].reshape(-1).double()
    gram = (xs * ws[:, None]).T @ xs / ws.sum()
    torch.testing.assert_close(st.mean_gram, gram.float())
    torch.testing.assert_close(st.mean_abs, ((xs.abs() * ws[:, None]).sum(0) / ws.sum()).float())
    np.testing.assert_allclose(st.mean_sq, torch.diagonal(gram).numpy(), rtol=1e-6)
    assert st.n == pytest.approx(float(ws.sum()))
    plain = InputStats(16, skip_first=skip_first)  # unit weights are the unweighted statistics
    plain.add(x)
    ones = InputStats(16, skip_first=skip_first)
    ones.add(x, torch.ones(3, 10))
    torch.testing.assert_close(ones.mean_gram, plain.mean_gram)
    assert ones.n == plain.n == 3 * (10 - skip_first)


def test_residual_weights_keep_a_sink_position_from_dominating() -> None:
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(2, 8, 32, generator=gen)
    h[:, 0, 5] = 300.0  # the attention sink's massive residual at position 0
    x = torch.randn(2, 8, 16, generator=gen)
    x[:, 0, 7] = 1000.0  # and its massive input to the reader
    w = residual_weights(h)
    torch.testing.assert_close(w, 1.0 / (h**2).mean(-1))
    uniform, weighted = InputStats(16), InputStats(16)
    uniform.add(x)
    weighted.add(x, w)
    assert uniform.mean_sq[7] > 1e4  # the sink is channel 7's whole mean square ...
    assert weighted.mean_sq[7] < 1e-2 * uniform.mean_sq[7]  # ... and a small share once weighed


def test_capture_weighs_per_token_readers_by_the_layer_output(tiny: Path) -> None:
    """Weights come from the decoder layer's output as the whole HF model computes it."""
    from transformers import AutoModelForCausalLM

    ckpt = llmq.Checkpoint(tiny)
    arch = llmq.get_arch(ckpt.config)
    assert {g.linears[0]: g.per_token for g in arch.scale_groups} == {
        "self_attn.q_proj": False,  # k/v errors reach other positions through attention
        "self_attn.o_proj": True,
        "mlp.gate_proj": True,
        "mlp.down_proj": True,
    }
    tokens = torch.randint(3, ckpt.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    flow = CalibrationFlow(tokens, ckpt.get(arch.embed), ckpt.config, arch, batch_size=2)
    layer = llmq.LayerStream(ckpt, arch).load(0)
    stats = flow.capture(
        layer, ["self_attn.q_proj", "mlp.down_proj"], write_outputs=False, residual_weighted={"mlp.down_proj"}
    )
    flow.close()

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(f"model.layers.0.{n}").register_forward_pre_hook(
            lambda _m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).double())
        )
        for n in ("self_attn.q_proj", "mlp.down_proj")
    ]
    with torch.no_grad():
        h_out = model(tokens, output_hidden_states=True).hidden_states[1]  # layer 0's output
    for h in hooks:
        h.remove()
    w = (1.0 / (h_out.double() ** 2).mean(-1)).reshape(-1, 1)
    down = seen["mlp.down_proj"]
    want = (down * w).T @ down / w.sum()
    torch.testing.assert_close(stats["mlp.down_proj"].mean_gram, want.float(), rtol=2e-4, atol=1e-6)
    q = seen["self_attn.q_proj"]
    torch.testing.assert_close(
        stats["self_attn.q_proj"].mean_gram, (q.T @ q / len(q)).float(), rtol=2e-4, atol=1e-6
    )
    assert stats["self_attn.q_proj"].n == 4 * 16


def test_token_weight_through_convert_and_cli(tiny: Path, tmp_path: Path) -> None:
    from llmq.cli import main

    base = ["convert", str(tiny), "--quant", "Q4_0", "--calib-samples", "4", "--calib-seqlen", "32"]
    base += ["--calib-batch", "2", "--no-card", "-q"]
    outs = {}
    for mode in ("uniform", "residual"):
        outs[mode] = tmp_path / f"{mode}.gguf"
        assert main([*base, "-o", str(outs[mode]), "--awq-token-weight", mode]) == 0
    words = [parse_awq_text(gguf.GGUFReader(outs[m]).fields["llmq.awq"].contents()) for m in outs]
    assert "tokens" not in words[0] and words[1]["tokens"] == "residual"
    report = json.loads(outs["residual"].with_suffix(".search.json").read_text())
    assert report["awq"]["token_weight"] == "residual"
    # the per-token readers' statistics changed, so their stored weights did; q/k/v's did not
    readers = [gguf.GGUFReader(outs[m]) for m in outs]
    data = [{t.name: t.data.tobytes() for t in r.tensors} for r in readers]
    assert data[0]["blk.0.ffn_down.weight"] != data[1]["blk.0.ffn_down.weight"]
    assert data[0]["blk.0.attn_q.weight"] == data[1]["blk.0.attn_q.weight"]
    with pytest.raises(llmq.LlmqError, match="--awq-token-weight norm: choose one of uniform, residual"):
        AWQConfig(token_weight="norm")
