"""The search and the encoders where the statistics are: the CPU and, where one is present, a GPU.

With ``--device cuda`` the statistics live on the GPU, and the AWQ scale and clip searches score
their candidates there (the K-quants encode there with libggml's bytes; the other types go through
the CPU and back), and error feedback runs its column loop there. These tests hold each step on
each device to the CPU's NumPy reference. On a machine without a GPU they run on the CPU alone;
`tools/device_check.sh` runs them on a lent one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmq.activations import InputStats
from llmq.awq import scale_losses
from llmq.clip import clip_search, output_error
from llmq.codecs import REGISTRY
from llmq.encoding import EncoderConfig, Target, encode_tensor
from llmq.gptq import encode_feedback, feedback_factor
from llmq.plan import TensorPlan

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# a K-quant (encoded on the device) and a legacy type (through the CPU)
TYPES = [("Q4_K", 256), ("Q6_K", 256), ("Q4_0", 32), ("Q5_1", 32)]


def _torch_fake_quant(t: Target, w: torch.Tensor, imp: np.ndarray) -> torch.Tensor:
    """``t``'s values of ``w`` encoded by the torch K codec on ``w``'s device (what `fake_quant` does
    there when no libggml is installed)."""
    codec = REGISTRY[t.codec]
    return codec.decode(
        codec.encode(w, imp if t.encoder.weighted else None, refine=t.encoder.refine), tuple(w.shape)
    )


def _stats(k: int, device: str, seed: int) -> InputStats:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(700, k, generator=gen) * torch.linspace(0.1, 4.0, k) + torch.randn(1, k, generator=gen)
    st = InputStats(k, device)
    st.add(x.to(device))
    return st


def _weights(rows: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=gen) * (1 + 3 * torch.rand(rows, 1, generator=gen))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("codec", "group"), TYPES)
def test_fake_quant_of_a_tensor_is_the_numpy_values(device: str, codec: str, group: int) -> None:
    w = _weights(24, 512, 1)
    imp = np.linspace(0.5, 2.0, 512, dtype=np.float32)
    for weighted, refine in ((True, False), (False, False), (True, True)):
        t = Target(codec, group, EncoderConfig(weighted=weighted, refine=refine))
        ours = t.fake_quant(w.to(device), imp)
        if device != "cpu" and REGISTRY[codec].array_api:  # the torch encoders there, libggml or not
            forced = _torch_fake_quant(t, w.to(device), imp)
            np.testing.assert_array_equal(forced.cpu().numpy(), t.fake_quant(w.numpy(), imp))
        assert isinstance(ours, torch.Tensor) and ours.device.type == device
        on_gpu = device != "cpu" and REGISTRY[codec].array_api and not t.grouped and not t.fast_cpu()
        assert t.on_device(torch.device(device)) == on_gpu
        np.testing.assert_array_equal(ours.cpu().numpy(), t.fake_quant(w.numpy(), imp))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("codec", "group"), TYPES)
def test_scale_losses_on_the_device_are_the_cpus(device: str, codec: str, group: int) -> None:
    k = 512
    t = [Target(codec, group, EncoderConfig())]
    ws = [_weights(64, k, 2), _weights(32, k, 3)]
    candidates = [
        None,
        torch.linspace(0.5, 2.0, k),
        torch.rand(k, generator=torch.Generator().manual_seed(4)) + 0.5,
    ]
    cpu = scale_losses(ws, t * 2, _stats(k, "cpu", 5), candidates, sample=40)
    dev = scale_losses(ws, t * 2, _stats(k, device, 5), candidates, sample=40)
    np.testing.assert_allclose(dev, cpu, rtol=1e-4)
    assert int(np.argmin(dev)) == int(np.argmin(cpu))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("codec", "group"), TYPES)
def test_clip_search_on_the_device_is_the_cpus(device: str, codec: str, group: int) -> None:
    k = 512
    w = _weights(48, k, 6)
    st_cpu, st_dev = _stats(k, "cpu", 7), _stats(k, device, 7)
    t = Target(codec, group, EncoderConfig())
    ratios = [1.0, 0.95, 0.9, 0.85, 0.8]
    want, info = clip_search(w, t, st_cpu.gram, st_cpu.mean_sq, ratios, tokens=st_cpu.n)
    got, dinfo = clip_search(w, t, st_dev.gram, st_dev.mean_sq, ratios, tokens=st_dev.n)
    assert info["clipped_fraction"] > 0  # the search did clip something
    # the same choice for (nearly) every group: a near-tie may fall the other way on other hardware
    same = (got.cpu() == want).all(dim=1).float().mean()
    assert same >= 0.95, float(same)
    assert dinfo["loss_after"] == pytest.approx(info["loss_after"], rel=1e-3)


def _feedback_case(k: int) -> tuple[np.ndarray, torch.Tensor]:
    gen = torch.Generator().manual_seed(8)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = torch.randn(2000, k, generator=gen) @ mix  # correlated inputs: feedback has work to do
    return _weights(32, k, 9).numpy(), x.T @ x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec", ["Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q8_0"])
def test_feedback_with_a_tensor_factor_chooses_numpys_codes(device: str, codec: str) -> None:
    k = 512
    w, gram = _feedback_case(k)
    c = REGISTRY[codec]
    imp = np.diagonal(gram.numpy()).copy()
    ref = encode_feedback(c, w, feedback_factor(gram), imp, refine=False)
    factor = feedback_factor(gram.to(device), on_device=True)
    if device != "cpu":
        assert isinstance(factor, torch.Tensor) and factor.device.type == device
    else:
        factor = torch.from_numpy(factor)  # a tensor factor selects the torch loop on the CPU too
    ours = encode_feedback(c, w, factor, imp, refine=False)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    same = (ours.reshape(-1, c.type_size) == ref.reshape(-1, c.type_size)).all(axis=1).mean()
    assert same >= 0.9, (codec, same)  # the codes differ only where a sum rounds the other way
    h = gram / 2000
    errs = [output_error(torch.from_numpy(w - c.decode(d, w.shape)), h) for d in (ref, ours)]
    assert errs[1] == pytest.approx(errs[0], rel=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_encode_tensor_with_a_device_factor(device: str) -> None:
    """A GPU's factor: the first encoding in slabs on the CPU, the feedback on the GPU at once."""
    k = 512
    w, gram = _feedback_case(k)
    plan = TensorPlan(
        "blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", w.shape, "Q4_K", 256, 0, "linear"
    )
    enc = EncoderConfig(refine=True, feedback=True)
    imp = np.diagonal(gram.numpy()).copy()
    ref = encode_tensor(plan, torch.from_numpy(w), imp, encoder=enc, factor=feedback_factor(gram))
    factor = torch.as_tensor(feedback_factor(gram.to(device), on_device=True))
    ours = encode_tensor(plan, torch.from_numpy(w), imp, encoder=enc, factor=factor)
    c = REGISTRY["Q4_K"]
    a, b = (c.grid_blocks(d.reshape(-1, c.type_size)) for d in (ref, ours))
    np.testing.assert_array_equal(a[0], b[0])  # the refined scales and mins: the same first encoding
    np.testing.assert_array_equal(a[1], b[1])
    assert (a[2] == b[2]).mean() >= 0.99


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0"])
def test_a_conversion_on_the_device_writes_the_cpus_file(tmp_path, device: str, quant: str) -> None:
    """The default recipes (K: scales, refinement, feedback; legacy: scales and clipping) on ``device``.

    The calibration forwards of a GPU round differently from the CPU's, so a few codes may differ;
    on the CPU the two runs are the same run and every byte must match.
    """
    import gguf
    from tiny_models import make_tiny_llama

    import llmq

    model = make_tiny_llama(tmp_path / "m", hidden=256, intermediate=512, dtype=torch.float32, outliers=4.0)
    calib = llmq.CalibConfig("builtin", n_samples=4, seqlen=32)
    tensors = {}
    for dev in ("cpu", device):
        out = tmp_path / f"{dev}.gguf"
        llmq.convert(
            model, out, llmq.QuantConfig(quant=quant), calib=calib, device=dev,
            progress=False, write_card=False, write_report=False, overwrite=True,
        )  # fmt: skip
        tensors[dev] = {t.name: (t.tensor_type, np.array(t.data)) for t in gguf.GGUFReader(out).tensors}
    assert tensors["cpu"].keys() == tensors[device].keys()
    for name, (qtype, data) in tensors["cpu"].items():
        other_type, other = tensors[device][name]
        assert other_type == qtype, name
        same = float((data.view(np.uint8) == other.view(np.uint8)).mean())
        assert same >= (1.0 if device == "cpu" else 0.9), (name, same)
