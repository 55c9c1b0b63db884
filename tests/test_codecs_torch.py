"""Codecs on torch tensors: the K-quants encode and decode on the tensor's device, with libggml's bytes.

Every codec accepts a torch tensor and answers with one on the same device. Codecs declaring
``array_api`` (the K-quants) run their search in torch itself, so it runs on CUDA too; the others
go through NumPy on the CPU. The devices tested are the CPU and, where one is present, CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants
from kquant_cases import MIN_IDENTICAL, GgmlQuantize, cases, importances, random_bytes

from llmq.codecs import REGISTRY

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ARRAY_API = sorted(n for n, c in REGISTRY.items() if c.array_api)
OTHERS = sorted(n for n, c in REGISTRY.items() if not c.array_api)


def test_the_k_quants_run_in_torch() -> None:
    assert ARRAY_API == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ARRAY_API)
def test_torch_encode_matches_ggml(name: str, device: str, ggml_quantize: GgmlQuantize) -> None:
    codec = REGISTRY[name]
    rng = np.random.default_rng(30)
    for label, x in cases(rng).items():
        imps = {"none": None, **importances(rng, x.shape[1])}
        for ilabel, imp in imps.items():
            ours = codec.encode(
                torch.from_numpy(x).to(device), None if imp is None else torch.from_numpy(imp).to(device)
            )
            assert isinstance(ours, torch.Tensor) and ours.device.type == device and ours.dtype == torch.uint8
            ours = ours.cpu().numpy()
            ref = ggml_quantize(codec, x, imp)
            same = (ours.reshape(-1, codec.type_size) == ref.reshape(-1, codec.type_size)).all(axis=1)
            assert same.mean() >= MIN_IDENTICAL, f"{name} {label}/{ilabel}: {same.sum()}/{same.size}"
            # one algorithm, whatever the array library: the NumPy path's bytes exactly
            assert np.array_equal(ours, codec.encode(x, imp)), f"{name} {label}/{ilabel}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ARRAY_API)
def test_torch_decode_equals_gguf(name: str, device: str) -> None:
    codec = REGISTRY[name]
    data = random_bytes(codec, 48, np.random.default_rng(31)).reshape(24, -1)
    ref = quants.dequantize(data, codec.qtype).reshape(24, 512)
    ours = codec.decode(torch.from_numpy(data).to(device), (24, 512))
    assert ours.device.type == device and ours.dtype == torch.float32
    assert np.array_equal(ours.cpu().numpy().view(np.uint32), ref.view(np.uint32)), name


@pytest.mark.parametrize("name", OTHERS)
def test_other_codecs_take_tensors_through_numpy(name: str) -> None:
    codec = REGISTRY[name]
    x = np.random.default_rng(32).standard_normal((4, 256)).astype(np.float32)
    imp = np.linspace(0.1, 2.0, 256, dtype=np.float32)
    got = codec.encode(torch.from_numpy(x), torch.from_numpy(imp))
    assert isinstance(got, torch.Tensor) and np.array_equal(got.numpy(), codec.encode(x, imp))
    back = codec.decode(got, x.shape)
    assert isinstance(back, torch.Tensor) and np.array_equal(back.numpy(), codec.decode(got.numpy(), x.shape))


def test_torch_input_errors_name_the_tensor() -> None:
    codec = REGISTRY["Q4_K"]
    with pytest.raises(ValueError, match="rows in blocks of 256"):
        codec.encode(torch.zeros(2, 300))
    with pytest.raises(ValueError, match="importance"):
        codec.encode(torch.zeros(2, 256), torch.full((256,), float("nan")))
