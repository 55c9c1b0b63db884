"""The default search and encoder settings per type family: the best measured (BENCHMARKS.md).

K-quant types and mixes: AWQ scales with the next layer's inputs from the FP layer, no clipping,
K-quant refinement and error-feedback rounding — on SmolLM2 (plain and dithered references) this
beats every other combination measured and llama.cpp's importance-matrix quants on KL for Q3_K_M,
Q4_K_S, Q4_K_M and Q5_K_M ("Stop 13" in BENCHMARKS.md). Legacy types and group-wise schemes keep
scales, clipping and inputs from the quantized layer: the K recipe ties on Q4_0 on the dithered
reference, loses on the plain one, and loses on groups of 128 on both ("Recipe per type family").
Round to nearest uses none of it: its bytes stay llama.cpp's.
"""

from __future__ import annotations

from .awq import AWQConfig
from .config import QuantConfig
from .encoding import EncoderConfig

K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def is_k_family(cfg: QuantConfig) -> bool:
    return cfg.mix is not None or cfg.codec_name in K_TYPES


def default_awq(cfg: QuantConfig) -> AWQConfig:
    """The AWQ search settings a run of ``cfg`` gets when none are given."""
    return AWQConfig(inputs="fp", clip=False) if is_k_family(cfg) else AWQConfig()


def default_encoder(cfg: QuantConfig) -> EncoderConfig:
    """The encoder options a run of ``cfg`` gets when none are given."""
    if cfg.method == "awq" and is_k_family(cfg):
        return EncoderConfig(refine=True, feedback=True)
    return EncoderConfig()
