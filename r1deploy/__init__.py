"""r1deploy: plan, serve and benchmark DeepSeek-R1-family models.

`LLM` and `SamplingParams` are imported lazily so that the planner runs without loading torch.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from r1deploy.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from r1deploy.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'r1deploy' has no attribute {name!r}")
