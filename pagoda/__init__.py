"""pagoda: an LLM serving system with a paged-KV, continuous-batching inference engine."""

from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: it pulls in torch and transformers
        from pagoda.engine.llm import LLM
        return LLM
    raise AttributeError(name)
