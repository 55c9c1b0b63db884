"""Inputs shared by the K-quant tests: edge-case tensors, importance vectors, random block bytes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmq.codecs import Codec

# the shared libggml fixture (tests/conftest.py): f(codec, x, importance=None) -> bytes
GgmlQuantize = Callable[..., np.ndarray]
MIN_IDENTICAL = 0.999  # fraction of blocks that must be byte-identical to ggml's


def cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    normal = rng.standard_normal((64, 512)).astype(np.float32)
    scaled = normal * rng.choice(np.array([1e-6, 1e-3, 1.0, 30.0, 1e4], np.float32), (64, 1))
    x = rng.standard_normal((24, 512)).astype(np.float32)
    x[0] = 0.0  # all-zero super-blocks
    x[1, :256] = 3.0  # constant super-blocks, positive and negative
    x[1, 256:] = -2.5
    x[2, 7] = 1e3  # one huge outlier
    x[3, 300] = -5e4
    x[4] = np.abs(x[4])  # all-positive: mins clamp to 0
    x[5] = -np.abs(x[5])
    x[6, :64] = -0.0  # signed zeros around one value
    x[6, 3] = 2.0
    x[7] = rng.integers(-16, 16, 512) / 2  # exact halves: rounding ties
    x[8] *= 1e-7  # f16-subnormal scales
    x[9] *= 1.5e4  # scales near the f16 maximum
    x[10, ::2] = -x[10, 1::2]  # |max| ties of opposite sign
    # sub-blocks of 16 scaled independently, zero sub-blocks included (scale-0 paths)
    sub = rng.choice(np.array([0.0, 1e-4, 1.0, 50.0], np.float32), (13, 32, 1))
    x[11:] = (x[11:].reshape(13, 32, 16) * sub).reshape(13, 512)
    return {"normal": normal, "scaled": scaled, "extreme": x}


def importances(rng: np.random.Generator, k: int) -> dict[str, np.ndarray]:
    lognormal = np.exp(rng.standard_normal(k) * 1.5).astype(np.float32)  # imatrix-like spread
    sparse = lognormal.copy()
    sparse[rng.random(k) < 0.3] = 0.0  # dead columns: zero weight
    sparse[:16] = 0.0  # a whole sub-block with no weight
    return {"lognormal": lognormal, "sparse": sparse, "flat": np.ones(k, np.float32)}


def random_bytes(codec: type[Codec], n: int, rng: np.random.Generator) -> np.ndarray:
    raw = rng.integers(0, 256, size=(n, codec.type_size), dtype=np.uint8)
    hi = raw.reshape(-1)[1::2]  # every f16 field sits at an even offset: keep them finite
    hi[(hi & 0x7C) == 0x7C] &= 0xBF
    return raw
