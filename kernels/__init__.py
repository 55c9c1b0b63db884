"""NumPy reference kernels (installed as ``llmq.kernels``): decode and dequant-matmul for every format.

Installed under the llmq namespace on purpose: a top-level ``kernels`` module would shadow the
Hugging Face package of that name, which transformers probes for.
"""
