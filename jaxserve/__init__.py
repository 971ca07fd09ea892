"""jaxserve: an LLM serving engine built on JAX/XLA for NVIDIA GPUs."""

__version__ = "0.1.0"
