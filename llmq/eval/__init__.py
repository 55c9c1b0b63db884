"""Evaluation: perplexity and KL divergence on three backends, generation and reference quantization.

`evaluate` runs llama-perplexity's protocol on a Hugging Face checkpoint (torch), a GGUF through
llama.cpp, or a GGUF through llmq's reference kernels (numpy), optionally against a reference
model; `llmq.eval.llamacpp` holds the llama.cpp-only tools.

The names are loaded on first use, so `import llmq.eval` works without llama-cpp-python installed;
touching one that needs it then raises ImportError saying to `pip install llama-cpp-python`.

Example:
    >>> from llmq.eval import evaluate, perplexity
    >>> perplexity("model.Q4_0.gguf", text, n_chunks=40).ppl
    >>> evaluate("model.Q4_0.gguf", text, ref="model.F16.gguf", n_chunks=40).kl.mean
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .evaluation import EvalResult, evaluate
    from .llamacpp import FTYPES, greedy_generate, perplexity, quantize_with_llama_cpp
    from .protocol import KLStats, PerplexityResult

__all__ = [
    "FTYPES",
    "EvalResult",
    "KLStats",
    "PerplexityResult",
    "evaluate",
    "greedy_generate",
    "perplexity",
    "quantize_with_llama_cpp",
]

_LAZY = {
    "FTYPES": ".llamacpp",
    "greedy_generate": ".llamacpp",
    "perplexity": ".llamacpp",
    "quantize_with_llama_cpp": ".llamacpp",
    "EvalResult": ".evaluation",
    "evaluate": ".evaluation",
    "KLStats": ".protocol",
    "PerplexityResult": ".protocol",
}


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: importing llama_cpp costs ~0.5 s and is an optional dependency.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
