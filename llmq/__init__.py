"""llmq: weight-only LLM quantization into GGUF files (llama.cpp) and safetensors checkpoints (transformers, vLLM).

Example:
    >>> import llmq
    >>> result = llmq.convert("path/to/hf-model", config=llmq.QuantConfig(bits=4, group_size=128),
    ...                       calib=llmq.CalibConfig("calibration.txt"))
    >>> print(result.summary())
    >>> qm = llmq.quantize("path/to/hf-model", llmq.QuantConfig(quant="Q4_0"))  # in memory, with a report
"""

from __future__ import annotations

__version__ = "0.1.0"

from .arch import ArchSpec, ScaleGroup, get_arch
from .awq import AWQConfig
from .calib import CalibConfig
from .codecs import REGISTRY as CODECS
from .codecs import Codec, get_codec
from .config import QuantConfig
from .encoding import EncoderConfig
from .errors import FormatError, LlmqError, OutputExistsError, SourceError, UnsupportedArchitectureError
from .inspect import inspect_gguf
from .pipeline import convert
from .plan import TensorPlan, plan_tensors
from .quantize import QuantizedModel, quantize
from .result import ConvertResult
from .sinks import FORMATS
from .source import Checkpoint, resolve_source
from .stream import LayerStream
from .writers import GGUFStreamWriter

__all__ = [
    "AWQConfig",
    "CalibConfig",
    "QuantizedModel",
    "ScaleGroup",
    "quantize",
    "CODECS",
    "ArchSpec",
    "Checkpoint",
    "Codec",
    "ConvertResult",
    "EncoderConfig",
    "FORMATS",
    "FormatError",
    "GGUFStreamWriter",
    "LayerStream",
    "LlmqError",
    "OutputExistsError",
    "QuantConfig",
    "SourceError",
    "TensorPlan",
    "UnsupportedArchitectureError",
    "__version__",
    "convert",
    "get_arch",
    "get_codec",
    "inspect_gguf",
    "plan_tensors",
    "resolve_source",
]
