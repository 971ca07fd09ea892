"""jaxserve: an LLM serving engine built on JAX/XLA for NVIDIA GPUs.

    from jaxserve import LLM, SamplingParams
"""

__version__ = "0.1.0"

from jaxserve.engine.outputs import CompletionOutput, InvalidRequestError, RequestOutput  # noqa: E402
from jaxserve.sampling.params import SamplingParams, SamplingParamsError  # noqa: E402


def __getattr__(name):  # LLM pulls in JAX and the models: import it lazily
    if name == "LLM":
        from jaxserve.engine.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from jaxserve.engine.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)


__all__ = ["LLM", "AsyncEngine", "SamplingParams", "SamplingParamsError", "RequestOutput",
           "CompletionOutput", "InvalidRequestError"]
