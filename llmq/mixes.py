"""llama.cpp's K-quant mixes (``Q4_K_M`` ...): which GGUF type each tensor gets, as one table of data.

A mix names a default type for the linears plus rules that give some tensors more bits, as
llama-quantize's `llama_tensor_get_type` does (non-MoE, non-Falcon models): first the user's
``--tensor-type PATTERN=TYPE`` overrides (regex searched in the GGUF name, first match wins), else
the mix's rules for the tensor's category, then the shape fallback (`plan.FALLBACK`) when a row does
not split into the type's blocks. The output tensor (and a tied token embedding) gets Q6_K, or
Q8_0 when its rows do not split into the mix's blocks.

Not modeled: the rules for Falcon models and the 70B-only attn_v bump.

Example:
    >>> [r for r in MIXES["Q4_K_M"].rules if r.category == "ffn_down"]
    [Rule(category='ffn_down', type='Q6_K', when='more_bits')]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import gguf

from .errors import FormatError


@dataclass(frozen=True)
class Rule:
    """Tensors of ``category`` get ``type`` when the condition ``when`` (a key of `WHEN`) holds."""

    category: str
    type: str
    when: str = "always"


@dataclass(frozen=True)
class Mix:
    """One llama.cpp file type: its default linear type, ``general.file_type`` and rules (first match wins)."""

    name: str
    default: str
    file_type: gguf.LlamaFileType
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class ModelShape:
    """What the rules look at: layer count, query heads per KV head, whether the embedding is tied,
    experts per MoE layer (0 for none)."""

    n_layers: int
    n_gqa: int = 1
    tied: bool = False
    n_expert: int = 0


def _more_bits(i: int, n: int) -> bool:
    # llama-quantize's `use_more_bits`: the first and last eighth of the layers, and every third between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# Conditions on (index i of the tensor within its category, count n of that category, model).
WHEN: dict[str, Callable[[int, int, ModelShape], bool]] = {
    "always": lambda i, n, m: True,
    "more_bits": lambda i, n, m: _more_bits(i, n),
    "first_eighth": lambda i, n, m: i < n // 8,
    "first_sixteenth": lambda i, n, m: i < n // 16,
    "first_2": lambda i, n, m: i < 2,
    "first_4": lambda i, n, m: i < 4,
    "gqa_ge_4": lambda i, n, m: m.n_gqa >= 4,
    # llama-quantize's rules for 8-expert models (Mixtral)
    "experts_8": lambda i, n, m: m.n_expert == 8,
    "not_experts_8": lambda i, n, m: m.n_expert != 8,
}

_F = gguf.LlamaFileType
# llama-quantize's rules for 8-expert models, ahead of each mix's own: attn_v and attn_k at Q8_0, and
# attn_output at Q5_K for the mixes below Q5 (the non-expert attn_output rules do not apply then)
_MOE8 = (Rule("attn_v", "Q8_0", "experts_8"), Rule("attn_k", "Q8_0", "experts_8"))
_MOE8_OUT = (*_MOE8, Rule("attn_output", "Q5_K", "experts_8"))
MIXES: dict[str, Mix] = {
    m.name: m
    for m in (
        Mix(
            "Q2_K",
            "Q2_K",
            _F.MOSTLY_Q2_K,
            (
                *_MOE8_OUT,
                Rule("attn_v", "Q4_K", "gqa_ge_4"),
                Rule("attn_v", "Q3_K"),
                Rule("ffn_down", "Q3_K"),
                Rule("attn_output", "Q3_K"),
            ),
        ),
        Mix("Q3_K_S", "Q3_K", _F.MOSTLY_Q3_K_S, _MOE8_OUT),
        Mix(
            "Q3_K_M",
            "Q3_K",
            _F.MOSTLY_Q3_K_M,
            (
                *_MOE8_OUT,
                Rule("attn_v", "Q5_K", "first_2"),
                Rule("attn_v", "Q4_K"),
                Rule("ffn_down", "Q5_K", "first_sixteenth"),
                Rule("ffn_down", "Q4_K"),
                Rule("attn_output", "Q4_K"),
            ),
        ),
        Mix(
            "Q3_K_L",
            "Q3_K",
            _F.MOSTLY_Q3_K_L,
            (
                *_MOE8,
                Rule("attn_v", "Q5_K"),
                Rule("ffn_down", "Q5_K"),
                Rule("attn_output", "Q5_K", "not_experts_8"),
            ),
        ),
        Mix(
            "Q4_K_S",
            "Q4_K",
            _F.MOSTLY_Q4_K_S,
            (*_MOE8_OUT, Rule("attn_v", "Q5_K", "first_4"), Rule("ffn_down", "Q5_K", "first_eighth")),
        ),
        Mix(
            "Q4_K_M",
            "Q4_K",
            _F.MOSTLY_Q4_K_M,
            (
                *_MOE8_OUT,
                Rule("attn_v", "Q6_K", "more_bits"),
                Rule("ffn_down", "Q6_K", "more_bits"),
            ),
        ),
        Mix("Q5_K_S", "Q5_K", _F.MOSTLY_Q5_K_S, _MOE8),
        Mix(
            "Q5_K_M",
            "Q5_K",
            _F.MOSTLY_Q5_K_M,
            (
                *_MOE8,
                Rule("attn_v", "Q6_K", "more_bits"),
                Rule("ffn_down", "Q6_K", "more_bits"),
            ),
        ),
        Mix("Q6_K", "Q6_K", _F.MOSTLY_Q6_K, _MOE8),
    )
}

# llama.cpp's `tensor_get_category`: (substring of the GGUF name, category), first match wins. A fused
# attn_qkv (Phi-3) and attn_kv_b are "attn_v-like" (`category_is_attn_v`): they take attn_v's rules
# and count among the attn_v tensors (`llama_tensor_get_type`; its separate attn_qkv branch after that
# is never reached).
_CATEGORIES = (
    ("attn_qkv.weight", "attn_v"),
    ("attn_kv_b.weight", "attn_v"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)


def category(name: str) -> str:
    """The rule category of a GGUF tensor name (``blk.3.attn_v.weight`` -> ``attn_v``)."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part, cat in _CATEGORIES:
        if part in name:
            return cat
    return "other"


def parse_tensor_types(specs: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``["attn_v=Q8_0", ...]`` -> ``(("attn_v", "Q8_0"), ...)``, each pattern a valid regex, each type known.

    Raises:
        FormatError: for a malformed entry, a bad regex or an unknown type.
    """
    from .codecs import REGISTRY

    out = []
    for spec in specs:
        pattern, sep, type_name = spec.partition("=")  # llama-quantize splits at the first '='
        pattern = pattern.lower()  # and lowercases the pattern (GGUF names are lowercase)
        if not sep or not pattern or not type_name:
            raise FormatError(f"tensor type override {spec!r}: expected PATTERN=TYPE, e.g. ffn_down=Q6_K")
        try:
            re.compile(pattern)
        except re.error as e:
            raise FormatError(
                f"tensor type override {spec!r}: {pattern!r} is not a valid regular expression ({e})"
            ) from e
        if type_name.upper() not in REGISTRY:
            raise FormatError(
                f"tensor type override {spec!r}: unknown type {type_name!r}; known: {', '.join(sorted(REGISTRY))}"
            )
        out.append((pattern, type_name.upper()))
    return tuple(out)


def override(name: str, tensor_types: tuple[tuple[str, str], ...]) -> str | None:
    """The type the first matching ``--tensor-type`` pattern gives ``name``, if any."""
    for pattern, type_name in tensor_types:
        if re.search(pattern, name):
            return type_name
    return None


def mix_type(mix: Mix, name: str, layer: int | None, shape: tuple[int, ...], model: ModelShape) -> str:
    """The type ``mix`` gives one tensor before the shape fallback (llama.cpp's `llama_tensor_get_type_impl`).

    Args:
        mix: the file type.
        name: the GGUF tensor name.
        layer: its decoder layer (the index the layer-count rules use), None outside the layers.
        shape: numpy shape ``(rows, row_length)``.
        model: layer count, GQA ratio, tied embedding.
    """
    from .codecs import REGISTRY

    cat = category(name)
    if cat == "output" or (cat == "token_embd" and model.tied):
        if shape[-1] % REGISTRY[mix.default].block_size:
            return "Q8_0"
        return mix.default if mix.default == "Q8_0" else "Q6_K"
    return _first_rule(mix.rules, cat, layer, model) or mix.default


def plain_type(name: str, layer: int | None, model: ModelShape) -> str | None:
    """The type llama-quantize forces on tensor ``name`` whatever the file type (its 8-expert attn_v
    and attn_k rule), or None."""
    return _first_rule(_MOE8, category(name), layer, model)


def _first_rule(rules: tuple[Rule, ...], cat: str, layer: int | None, model: ModelShape) -> str | None:
    for rule in rules:
        if rule.category == cat and WHEN[rule.when](layer or 0, model.n_layers, model):
            return rule.type
    return None
