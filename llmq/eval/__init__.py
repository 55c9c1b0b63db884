"""Evaluation of GGUF files: perplexity, generation and reference quantization through llama.cpp.

The names are loaded on first use, so `import llmq.eval` works without llama-cpp-python installed;
touching one of them then raises ImportError saying to `pip install llama-cpp-python`.

Example:
    >>> from llmq.eval import perplexity
    >>> perplexity("model.Q4_0.gguf", text, n_chunks=40).ppl
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .llamacpp import FTYPES, PerplexityResult, greedy_generate, perplexity, quantize_with_llama_cpp

__all__ = ["FTYPES", "PerplexityResult", "greedy_generate", "perplexity", "quantize_with_llama_cpp"]

_LAZY = {name: ".llamacpp" for name in __all__}


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: importing llama_cpp costs ~0.5 s and is an optional dependency.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
