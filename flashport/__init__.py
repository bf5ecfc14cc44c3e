"""flashport: a DeepSeek-V4-Flash inference engine in PyTorch and Triton, for NVIDIA, AMD and CPU."""

from flashport.sampling_params import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):  # `LLM` pulls in the model stack: import it on first use
    if name == "LLM":
        from flashport.llm import LLM

        return LLM
    raise AttributeError(name)
